"""Score tasks with a backend: tokenise the requests, run them sharded over data-parallel ranks, metrics.

Tokenisation follows lm-eval's rule for a (context, continuation) pair: trailing whitespace of the
context moves to the continuation, the pair is encoded whole and the continuation's tokens are those
past the context's own encoding; an empty context (the unconditional term of ``acc_mutual_info``)
becomes the tokenizer's BOS (else EOS) token. Every request is checked against the model's context
before anything runs. Generated text is cut at the first stop string, then the task's checker
extracts and compares the answer.
"""
import hashlib
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

from instella_plugin.evaluation import metrics as M
from instella_plugin.evaluation.backend import run_sharded
from instella_plugin.evaluation.checkers import CHECKERS
from instella_plugin.evaluation.examples import Example, build_examples
from instella_plugin.evaluation.task_config import TaskConfig
from instella_plugin.inference.api import SamplingParams


class ContextTooLong(ValueError):
    """A prompt (plus what is scored or generated after it) longer than the model's context."""


def _encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prefix_token_id(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """(context ids, continuation ids) as lm-eval's causal-model path makes them."""
    if context == "":
        cont = _encode(tokenizer, continuation)
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


@dataclass
class TaskRequests:
    cfg: TaskConfig
    examples: List[Example]
    pairs: List[Tuple[List[int], List[int]]]      # multiple choice: choices (then unconditional) per example
    prompts: List[List[int]]                       # generation: one per example


def needs_uncond(cfg: TaskConfig) -> bool:
    return "acc_mutual_info" in cfg.metrics


def build_requests(cfg: TaskConfig, examples: List[Example], tokenizer, max_length: int) -> TaskRequests:
    pairs, prompts = [], []
    for ex in examples:
        where = f"task {ex.task}{f' ({ex.part})' if ex.part and cfg.subtasks else ''} example {ex.index}"
        if cfg.output == "generate":
            text = ex.contexts[0]
            if cfg.chat:
                text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                     add_generation_prompt=True)
            ids = _encode(tokenizer, text)
            if len(ids) + cfg.generation.max_new_tokens > max_length:
                raise ContextTooLong(f"{where}: prompt of {len(ids)} tokens + max_new_tokens "
                                     f"{cfg.generation.max_new_tokens} exceeds the model's context of {max_length}; "
                                     "lower num_fewshot or generation.max_new_tokens, or use a longer-context model")
            prompts.append(ids)
            continue
        ex_pairs = [encode_pair(tokenizer, c, k) for c, k in zip(ex.contexts, ex.continuations)]
        if needs_uncond(cfg):  # lm-eval's unconditional terms: each choice's text after BOS alone
            ex_pairs += [encode_pair(tokenizer, "", cfg.target_delimiter + c) for c in ex.choices]
        for ctx, cont in ex_pairs:
            if len(ctx) + len(cont) - 1 > max_length or not cont:
                raise ContextTooLong(f"{where}: context of {len(ctx)} tokens + continuation of {len(cont)} does not "
                                     f"fit the model's context of {max_length}; lower num_fewshot or use a "
                                     "longer-context model")
        pairs.extend(ex_pairs)
    return TaskRequests(cfg, examples, pairs, prompts)


def _seed(base: int, task: str, part, index: int, sample: int) -> int:
    digest = hashlib.sha256(f"{base}/{task}/{part}/{index}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min([text.find(s) for s in stops if s and s in text] or [len(text)])
    return text[:cut]


def _progress(what: str, log, every_s: float = 10.0):
    """A reporter printing, at most every ``every_s`` seconds and at the end, requests done, rate and ETA."""
    start, last = time.time(), [0.0]

    def report(done: int, share: int, total: int):
        now = time.time()
        if log is None or (now - last[0] < every_s and done < share):
            return
        last[0] = now
        rate = done / max(now - start, 1e-9)
        log(f"{what}: {done}/{share} requests on this rank ({total} on all ranks) | {rate:.1f} requests/s | "
            f"ETA {max(share - done, 0) / max(rate, 1e-9):.0f}s")

    return report


def run_requests(reqs: List[TaskRequests], backend, log=None) -> Tuple[list, list]:
    """All log-likelihood and generation results, in request order, on every rank."""
    pairs = [p for r in reqs for p in r.pairs]
    ll = run_sharded(backend.loglikelihood, pairs, [len(c) + len(k) for c, k in pairs], backend.batch_size,
                     backend.dp_rank, backend.dp_size, backend.gather,
                     _progress("log-likelihood", log)) if pairs else []
    items = []
    for r in reqs:
        g = r.cfg.generation
        for ex, ids in zip(r.examples, r.prompts):
            for j in range(g.n):
                params = SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                                        top_p=g.top_p, stop=g.until,
                                        seed=_seed(g.seed, ex.task, ex.part, ex.index, j) if g.temperature else g.seed)
                items.append((ids, params))

    def generate(batch):  # one call for a batch of greedy prompts; sampled ones each with their own seed
        if all(p == batch[0][1] for _, p in batch):
            return [c.text for c in backend.generate([ids for ids, _ in batch], batch[0][1])]
        return [c.text for ids, p in batch for c in backend.generate([ids], p)]

    # requests with the same decoding settings (seeds aside) share batches; each group is sharded alike
    groups = {}
    for i, (_, p) in enumerate(items):
        groups.setdefault(replace(p, seed=0), []).append(i)
    texts = [None] * len(items)
    for members in groups.values():
        part = [items[i] for i in members]
        done = run_sharded(generate, part, [len(ids) for ids, _ in part], backend.batch_size, backend.dp_rank,
                           backend.dp_size, backend.gather, _progress("generation", log))
        for i, t in zip(members, done):
            texts[i] = t
    return ll, texts


def score_task(r: TaskRequests, ll: list, texts: list) -> dict:
    """Per-example records and the task's aggregate metrics from its slice of the results."""
    cfg, records = r.cfg, []
    if cfg.output == "multiple_choice":
        at = 0
        for ex in r.examples:
            n = len(ex.choices)
            got, pair_tokens = ll[at:at + n], [len(k) for _, k in r.pairs[at:at + n]]
            unc = ll[at + n:at + 2 * n] if needs_uncond(cfg) else None
            at += 2 * n if unc else n
            lls = [x for x, _ in got]
            m = M.multiple_choice(cfg.metrics, lls, ex.gold, [len(c) for c in ex.choices], pair_tokens,
                                  [x for x, _ in unc] if unc else None)
            records.append({"part": ex.part, "index": ex.index, "gold": ex.gold, "lls": lls,
                            "is_greedy": [g for _, g in got], "lls_uncond": [x for x, _ in unc] if unc else None,
                            "metrics": m})
    else:
        check, n = CHECKERS[cfg.checker], cfg.generation.n
        for k, ex in enumerate(r.examples):
            responses = [_cut_at_stop(t, cfg.generation.until) for t in texts[k * n:(k + 1) * n]]
            checked = [check(t, ex.gold, cfg.answer) for t in responses]
            m = M.generation(cfg.metrics, [c for _, c in checked])
            records.append({"part": ex.part, "index": ex.index, "gold": ex.gold, "responses": responses,
                            "extracted": [e for e, _ in checked], "metrics": m})
    per = [rec["metrics"] for rec in records]
    result = {"metrics": M.aggregate(per, cfg.metrics), "n": len(records), "version": cfg.version,
              "num_fewshot": cfg.num_fewshot, "primary_metric": cfg.primary, "output": cfg.output}
    if cfg.subtasks:
        result["subtasks"] = {p: {"metrics": M.aggregate([rec["metrics"] for rec in records if rec["part"] == p],
                                                         cfg.metrics),
                                  "n": sum(rec["part"] == p for rec in records)} for p in cfg.subtasks}
    if cfg.output == "generate":
        result["generation"] = {"n": cfg.generation.n, "temperature": cfg.generation.temperature,
                                "seed": cfg.generation.seed, "checker": cfg.checker}
    else:
        result["fewshot_seed"] = cfg.fewshot_seed
    return {"result": result, "samples": records}


def prepare(tasks: List[TaskConfig], data_dir: Optional[str], limit: Optional[int] = None) -> List[Tuple[TaskConfig, List[Example]]]:
    """Every task's examples (data read, prompts rendered): the checks that come before loading a model."""
    return [(cfg, build_examples(cfg, data_dir, limit)) for cfg in tasks]


def evaluate(tasks: List[TaskConfig], backend, data_dir: Optional[str] = None, limit: Optional[int] = None,
             prepared=None, log=None) -> Dict[str, dict]:
    """{"results": {task: metrics...}, "samples": {task: [records]}} on every rank."""
    prepared = prepared or prepare(tasks, data_dir, limit)
    reqs = [build_requests(cfg, exs, backend.tokenizer, backend.max_length) for cfg, exs in prepared]
    ll, texts = run_requests(reqs, backend, log)
    out = {"results": {}, "samples": {}}
    ll_at = gen_at = 0
    for r in reqs:
        n_ll, n_gen = len(r.pairs), len(r.prompts) * r.cfg.generation.n
        scored = score_task(r, ll[ll_at:ll_at + n_ll], texts[gen_at:gen_at + n_gen])
        ll_at, gen_at = ll_at + n_ll, gen_at + n_gen
        out["results"][r.cfg.name] = scored["result"]
        out["samples"][r.cfg.name] = scored["samples"]
    return out
