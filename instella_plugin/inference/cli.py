"""``instella generate``: text from a Megatron checkpoint through megatron-core's inference engine.

One prompt (``--prompt``) streams its tokens to the terminal; a prompts file (``--prompts-file``,
JSONL: ``prompt`` or ``messages`` per line) writes one JSON line per prompt to ``--output`` (or
stdout). Any TP/PP layout: launch TP x PP processes with torchrun, or a multiple of that: the
data-parallel replicas split the prompts (greedy results do not depend on the split). Input is
checked before anything heavy is loaded: the prompts file, the checkpoint's record and the layout,
then (tokenizer only) that every prompt plus ``--max-new-tokens`` fits the model's context.
"""
import argparse
import json
import os
import sys
import time

from instella_plugin.data.tokenizer import load_tokenizer
from instella_plugin.inference.api import SamplingParams
from instella_plugin.inference.patches import QUIET
from instella_plugin.inference.prompts import check_fits, prompt_ids, read_prompts_file

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load", required=True, help="save directory (its latest checkpoint) or an iter_N directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt; its tokens stream to the terminal")
    src.add_argument("--prompts-file", help="JSONL: one {\"prompt\": text} or {\"messages\": chat} per line")
    p.add_argument("--output", help="write JSONL results here (default: stdout for --prompts-file)")
    p.add_argument("--chat", action="store_true", help="wrap --prompt / \"prompt\" lines in the chat template "
                   "as one user turn (\"messages\" lines always use it)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--stop", action="append", default=[], help="stop after this string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the EOS token")
    p.add_argument("--logprobs", action="store_true", help="include per-token log-probabilities in the JSONL")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the one the checkpoint records)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on the CPU, bfloat16 on a GPU")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="instella generate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    # deferred: megatron-core (imported first by `instella`, with torch.compile deferred) is not needed by --help
    from instella_plugin.inference import loading

    try:
        prepared = prepare(args, loading)
    except (ValueError, OSError, RuntimeError) as e:  # bad input: a message, before any model is built
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _generate(args, loading, *prepared)


def prepare(args, loading):
    """Every input check that needs no model: (plan, tokenizer, prompt items, their ids, sampling params)."""
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), stop_at_eos=not args.ignore_eos)
    if args.max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    loading.check_world(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, data_parallel=True)
    items = read_prompts_file(args.prompts_file) if args.prompts_file else [{"prompt": args.prompt}]
    plan = loading.checkpoint_plan(args.load, args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    tok = load_tokenizer(args.tokenizer if args.tokenizer is not None else plan.tokenizer)
    loading.check_tokenizer(plan, tok)
    ids = [prompt_ids(tok, item, args.chat) for item in items]
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompt {i} is empty after tokenisation")
    check_fits(ids, params.max_new_tokens, plan.seq_length)
    return plan, tok, items, ids, params


def _generate(args, loading, plan, tok, items, ids, params) -> int:
    import torch

    from megatron.core import parallel_state

    device = loading.init_inference_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                             args.device, data_parallel=True)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    rank0 = torch.distributed.get_rank() == 0
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    t0 = time.time()
    gen = loading.load_generator(plan, tokenizer=tok, dtype=dtype, device=device, max_batch_size=args.max_batch_size)
    if rank0:
        print(f"loaded {plan.path} (iteration {plan.iteration}, {plan.model.preset}, TP={plan.tp} PP={plan.pp}, "
              f"{dtype}) in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    stream = _Stream(tok) if rank0 and args.prompt is not None and not args.output else None
    if args.prompt is not None:
        QUIET.apply()  # no progress bar between the streamed tokens
    t0 = time.time()
    mine = gen.generate(ids[dp_rank::dp_size], params, on_token=stream)  # data-parallel replicas split the prompts
    if dp_size > 1:
        shares = [None] * dp_size
        torch.distributed.all_gather_object(shares, mine, group=parallel_state.get_data_parallel_group())
        completions = [shares[i % dp_size][i // dp_size] for i in range(len(ids))]
    else:
        completions = mine
    seconds = time.time() - t0
    if rank0:
        if stream is not None:
            stream.finish(completions[0].text)
        else:
            _write(args.output, items, completions, args.logprobs)
        n = sum(len(c.tokens) for c in completions)
        reasons = ", ".join(sorted({c.finish_reason for c in completions}))
        print(f"{len(completions)} completion(s), {n} tokens in {seconds:.1f}s ({n / max(seconds, 1e-9):.1f} tokens/s); "
              f"finished by: {reasons}", file=sys.stderr, flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


class _Stream:
    """Prints a single prompt's text as its tokens arrive (decoding the whole so far, printing the new part)."""

    def __init__(self, tokenizer):
        self.tok, self.tokens, self.shown = tokenizer, [], ""

    def __call__(self, request: int, token: int) -> None:
        self.tokens.append(token)
        text = self.tok.decode(self.tokens, skip_special_tokens=True)
        if text.startswith(self.shown) and not text.endswith("\ufffd"):  # a whole character has arrived
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text

    def finish(self, final_text: str) -> None:
        if final_text.startswith(self.shown):
            sys.stdout.write(final_text[len(self.shown):])
        sys.stdout.write("\n")
        sys.stdout.flush()


def _write(path, items, completions, logprobs: bool) -> None:
    lines = []
    for item, c in zip(items, completions):
        row = {k: item[k] for k in ("id", "prompt", "messages") if k in item}
        row.update(completion=c.text, finish_reason=c.finish_reason, prompt_tokens=len(c.prompt_tokens),
                   tokens=list(c.tokens))
        if logprobs:
            row["logprobs"] = list(c.logprobs)
        lines.append(json.dumps(row, ensure_ascii=False))
    text = "\n".join(lines) + "\n"
    if not path:
        sys.stdout.write(text)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
