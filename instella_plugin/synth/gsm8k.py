"""The GSM8K-synthetic pipeline: seed problems -> programs -> new problems with checked answers.

For each seed problem (GSM8K train: question and "#### answer"):
1. abstract: the generator writes a program (``gsm8k_prompts.yaml``: ``PARAMETERS``, ``QUESTION``,
   ``constraints()``, ``answer()``);
2. verify: the program runs in the sandbox (``sandbox.py``); it must load, restate the problem
   (``QUESTION`` filled with ``PARAMETERS`` reads as the seed question) and reproduce the seed's answer;
3. re-instantiate: new parameter values are drawn (seeded) around the original ones, kept when the
   program's ``constraints`` accept them and its ``answer`` is a whole, non-negative number like GSM8K's;
4. decontaminate: new problems sharing an n-gram with the held-out test set are dropped
   (``decontaminate.py``);
5. agree: the generator solves each new problem step by step; only solutions whose final answer
   equals the program's are kept.
Output: JSONL, one record per kept problem, with its chat (``messages``), its stage-2 text (``text``)
and its provenance (seed, program, parameters, generator); the counts go to OUTPUT.summary.json and
OUTPUT.summary.png. Seeds are processed in batches; each
finished batch is on disk (``OUTPUT.partial`` plus ``OUTPUT.seeds.jsonl``) before the next starts, so
an interrupted run (a generator that went down) resumes where it stopped. ``Summary`` counts every
stage and every reason for rejection.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import random
import re
import string
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

from instella_plugin.data.convert import flatten_chat
from instella_plugin.data.jsonl_output import JsonlOutput, refuse_output, write_json_atomic
from instella_plugin.inference.api import SamplingParams
from instella_plugin.synth.decontaminate import NgramIndex
from instella_plugin.synth.sandbox import SandboxLimits, run_program
from instella_plugin.synth.summary_plot import plot_summary

PROMPTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gsm8k_prompts.yaml")
SOURCE = "gsm8k-synthetic"
FRACTIONS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.8, 0.9)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FINAL = re.compile(r"answer is:?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.I)


@dataclass(frozen=True)
class SynthConfig:
    """Settings of one run; a resumed run must use the same."""
    per_seed: int = 4                 # new problems kept per seed at most
    attempts: int = 24                # parameter draws per seed
    seed: int = 1234
    batch_size: int = 16
    ngram: int = 13
    min_similarity: float = 0.9       # QUESTION filled with PARAMETERS vs the seed question
    abstract_tokens: int = 768
    abstract_temperature: float = 0.7
    solve_tokens: int = 384


@dataclass
class Summary:
    seeds: int = 0
    abstracted: int = 0        # seeds whose program loaded with PARAMETERS, QUESTION and answer()
    verified: int = 0          # seeds whose program restated the problem and reproduced its answer
    reinstantiated: int = 0    # new problems from accepted parameter draws
    decontaminated: int = 0    # new problems dropped for overlapping the test set
    agreed: int = 0            # new problems whose generated solution matched the program
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)

    def add(self, other: dict) -> None:
        for k, v in other.items():
            if k == "rejected":
                self.rejected.update(v)
            else:
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["rejected"] = dict(self.rejected)
        return d

    def report(self) -> str:
        lines = [f"seeds {self.seeds}, abstracted {self.abstracted}, verified {self.verified}, re-instantiated "
                 f"{self.reinstantiated}, decontaminated {self.decontaminated}, agreed {self.agreed}, kept {self.kept}"]
        lines += [f"  rejected ({reason}): {n}" for reason, n in self.rejected.most_common()]
        return "\n".join(lines)


def load_prompts(path: str = PROMPTS_FILE) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def extract_program(text: str) -> Optional[str]:
    """The first fenced code block of a response (or the response, when it is bare code)."""
    m = re.search(r"```(?:python|py)?[ \t]*\n(.*?)```", text, re.S)
    if m:
        return m.group(1)
    return text if "def answer" in text else None


def number_of(text: str) -> Optional[float]:
    try:
        return float(text.replace(",", "").replace("$", "").strip())
    except ValueError:
        return None


def final_answer(solution: str) -> Optional[float]:
    """The number after the last "The answer is", else the last number of the text."""
    found = _FINAL.findall(solution) or _NUMBER.findall(solution)
    return number_of(found[-1]) if found else None


def same_number(a: Optional[float], b: Optional[float]) -> bool:
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def _fmt(x: float):
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


def draw_parameters(params: Dict[str, float], rng: random.Random) -> Dict[str, float]:
    """New values around the original ones: whole numbers stay whole (0 and 1 are kept: they are
    usually words, "one", "a"), fractions below 1 come from common fractions, other decimals scale."""
    new = {}
    for name, v in params.items():
        if isinstance(v, int):
            new[name] = v if v in (0, 1) else (rng.randint(max(2, v // 2), max(2 * v, v + 4)) if v > 0
                                              else -rng.randint(max(2, -v // 2), max(-2 * v, -v + 4)))
        elif 0 < v < 1:
            new[name] = rng.choice(FRACTIONS)
        else:
            decimals = min(2, len(repr(v).split(".")[1]) if "." in repr(v) else 0)
            new[name] = round(v * rng.uniform(0.5, 2.0), decimals) or v
    return new


def _valid_parameters(value) -> bool:
    """A non-empty dict of identifier -> finite number of a word problem's size (generated: checked)."""
    return (isinstance(value, dict) and bool(value) and all(isinstance(k, str) and k.isidentifier() for k in value)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= 1e12
                    for v in value.values()))


def _plain_template(template: str, params: dict) -> bool:
    """True when the generated ``QUESTION`` has only ``{name}`` fields naming parameters: it is filled in
    this process, so no format specs (``{x:>999999999}`` would allocate), conversions or attributes."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError:
        return False
    return all(name is None or (name in params and not spec and conversion is None)
               for _, name, spec, conversion in fields)


def _squash(text: str) -> str:
    return " ".join(text.split())


class Pipeline:
    """One run: ``process(batch)`` turns seed records into output records and counts."""

    def __init__(self, generator, test_index: NgramIndex, config: SynthConfig = SynthConfig(),
                 limits: SandboxLimits = SandboxLimits(), prompts: Optional[dict] = None, workers: int = 2):
        self.gen, self.index, self.cfg, self.limits, self.workers = generator, test_index, config, limits, workers
        self.prompts = prompts or load_prompts()
        describe = getattr(generator, "describe", None)
        self.generator_name = describe() if describe else type(generator).__name__

    def _abstract(self, seeds: Sequence[dict]) -> List[str]:
        prompts = [self.prompts["abstract"].replace("{question}", s["prompt"].strip()) for s in seeds]
        params = SamplingParams(max_new_tokens=self.cfg.abstract_tokens, temperature=self.cfg.abstract_temperature,
                                seed=self.cfg.seed)
        return [c.text for c in self.gen.generate(prompts, params)]

    def _verify(self, seed: dict, response: str, counts: Summary) -> Optional[Tuple[str, dict, str]]:
        program = extract_program(response)
        if program is None:
            counts.rejected["no program in the response"] += 1
            return None
        gold = number_of(seed["answer"])
        run = run_program(program, [{"function": "answer", "kwargs_global": "PARAMETERS"}], ("PARAMETERS", "QUESTION"),
                          self.limits)
        if run.reason is not None:
            counts.rejected[f"program: {run.reason}"] += 1
            return None
        params, template = run.globals.get("PARAMETERS"), run.globals.get("QUESTION")
        if not _valid_parameters(params) or not isinstance(template, str) or run.calls[0].get("error", "").startswith("no "):
            counts.rejected["program: lacks PARAMETERS (numbers), QUESTION or answer()"] += 1
            return None
        counts.abstracted += 1
        call = run.calls[0]
        if not call["ok"]:
            counts.rejected[f"program: {call['error']}"] += 1
            return None
        if not same_number(call["value"], gold):
            counts.rejected["program: does not reproduce the answer"] += 1
            return None
        if not _plain_template(template, params):
            counts.rejected["program: QUESTION is not plain text with {name} fields of PARAMETERS"] += 1
            return None
        restated = template.format(**params)
        if difflib.SequenceMatcher(None, _squash(restated), _squash(seed["prompt"])).ratio() < self.cfg.min_similarity:
            counts.rejected["program: QUESTION does not restate the problem"] += 1
            return None
        counts.verified += 1
        return program, params, template

    def _instances(self, seed_index: int, program: str, params: dict, template: str, gold: float,
                   counts: Summary) -> List[Tuple[str, dict, float]]:
        rng = random.Random(f"{self.cfg.seed}:{seed_index}")
        draws, seen = [], {json.dumps(params, sort_keys=True)}
        for _ in range(self.cfg.attempts):
            new = draw_parameters(params, rng)
            key = json.dumps(new, sort_keys=True)
            if key not in seen:
                seen.add(key)
                draws.append(new)
        calls = [c for new in draws for c in ({"function": "constraints", "kwargs": new, "boolean": True},
                                               {"function": "answer", "kwargs": new})]
        run = run_program(program, calls, (), self.limits)
        if run.reason is not None:
            counts.rejected[f"instance: {run.reason}"] += len(draws)
            return []
        out = []
        for k, new in enumerate(draws):
            ok, value = run.calls[2 * k], run.calls[2 * k + 1]
            reason = None
            if not ok["ok"] or not ok["value"]:
                reason = "outside the constraints" if ok["ok"] else f"constraints {ok['error']}"
            elif not value["ok"]:
                reason = value["error"]
            elif abs(value["value"] - round(value["value"])) > 1e-9 and abs(gold - round(gold)) < 1e-9:
                reason = "non-integer answer"
            elif value["value"] < 0 <= gold:
                reason = "negative answer"
            if reason:
                counts.rejected[f"instance: {reason}"] += 1
                continue
            question = template.format(**{n: _fmt(v) if isinstance(v, float) else v for n, v in new.items()})
            out.append((question, new, value["value"]))
            if len(out) == self.cfg.per_seed:
                break
        counts.reinstantiated += len(out)
        return out

    def _programs(self, item: Tuple[int, dict], response: str) -> Tuple[Summary, List[dict]]:
        """One seed's verified program, its instances and the decontamination (counts of its own)."""
        (index, seed), counts, problems = item, Summary(), []
        if number_of(seed["answer"]) is None:
            counts.rejected["seed: answer is not a number"] += 1
            return counts, problems
        verified = self._verify(seed, response, counts)
        if verified is None:
            return counts, problems
        program, params, template = verified
        instances = self._instances(index, program, params, template, number_of(seed["answer"]), counts)
        for draw, (question, new, value) in enumerate(instances):
            if self.index.contaminated(question):
                counts.decontaminated += 1
                continue
            problems.append(dict(seed=seed, program=program, params=new, question=question, value=value, draw=draw))
        return counts, problems

    def process(self, batch: Sequence[Tuple[int, dict]]) -> Tuple[List[dict], Summary]:
        """Output records and counts for ``batch`` of ``(seed index, {"id", "prompt", "answer"})``."""
        counts = Summary(seeds=len(batch))
        responses = self._abstract([s for _, s in batch])
        problems = []
        # the sandbox runs of different seeds are separate processes: run them side by side, merge in order
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for seed_counts, seed_problems in pool.map(self._programs, batch, responses):
                counts.add(seed_counts.as_dict())
                problems += seed_problems
        records = []
        if problems:
            params = SamplingParams(max_new_tokens=self.cfg.solve_tokens, temperature=0.0, seed=self.cfg.seed,
                                    stop=tuple(self.prompts.get("solve_stop", ())))
            prompts = [self.prompts["solve"].replace("{question}", p["question"]) for p in problems]
            for p, completion in zip(problems, self.gen.generate(prompts, params)):
                solution = completion.text
                for stop in params.stop:
                    solution = solution.split(stop)[0]
                solution = solution.strip()
                if not same_number(final_answer(solution), p["value"]):
                    counts.rejected["solution: disagrees with the program"] += 1
                    continue
                counts.agreed += 1
                records.append(self._record(p, solution))
        counts.kept = len(records)
        return records, counts

    def _record(self, p: dict, solution: str) -> dict:
        seed = p["seed"]
        messages = [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": solution}]
        return {"id": f"{SOURCE}-{seed['id']}-{p['draw']}", "source": SOURCE,
                "question": p["question"], "answer": str(_fmt(p["value"])), "solution": solution,
                "messages": messages, "text": flatten_chat(messages),
                "provenance": {"seed_id": seed["id"], "seed_question": seed["prompt"], "seed_answer": seed["answer"],
                               "program": p["program"], "parameters": p["params"], "generator": self.generator_name,
                               "decontamination_ngram": self.index.n}}


def _read_progress(path: str) -> Tuple[set, Summary]:
    done, summary = set(), Summary()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    entry = json.loads(line)
                    done.update(entry["seed_ids"])
                    summary.add(entry["counts"])
    return done, summary


def synthesise(seeds: Iterable[dict], output: str, generator, test_index: NgramIndex,
               config: SynthConfig = SynthConfig(), limits: SandboxLimits = SandboxLimits(), overwrite: bool = False,
               progress=None, workers: int = 2) -> Summary:
    """Run the pipeline over ``seeds`` (``{"id", "prompt", "answer"}``) into ``output``; resumes an
    interrupted run of the same settings. Returns the summary (also written to OUTPUT.summary.json)."""
    progress_path, settings_path = output + ".seeds.jsonl", output + ".settings.json"
    settings = dict(asdict(config), generator=getattr(generator, "describe", lambda: type(generator).__name__)(),
                    ngram=test_index.n, test_texts=test_index.texts)
    resuming = os.path.exists(output + ".partial") and os.path.exists(settings_path) and not overwrite
    if resuming:
        with open(settings_path, encoding="utf-8") as f:
            before = json.load(f)
        if before != settings:
            diff = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
            raise ValueError(f"{output}.partial was written with other settings {diff}; rerun with the same "
                             "settings to resume, or pass --overwrite to start again")
        done, summary = _read_progress(progress_path)
        _drop_unfinished(output + ".partial", done)
    else:
        refuse_output(output, overwrite)
        for stale in (progress_path, output + ".partial"):
            if os.path.exists(stale):
                os.remove(stale)
        write_json_atomic(settings_path, settings)
        done, summary = set(), Summary()
    pipeline = Pipeline(generator, test_index, config, limits, workers=workers)
    todo = [(i, s) for i, s in enumerate(seeds) if s["id"] not in done]
    with JsonlOutput(output, append=True) as out, open(progress_path, "a", encoding="utf-8") as log:
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start:start + config.batch_size]
            records, counts = pipeline.process(batch)
            for r in records:
                out.write(r, flush=True)
            log.write(json.dumps({"seed_ids": [s["id"] for _, s in batch], "counts": counts.as_dict()}) + "\n")
            log.flush()
            os.fsync(log.fileno())
            summary.add(counts.as_dict())
            if progress is not None:
                progress(len(batch), summary)
        out.commit()
    write_json_atomic(output + ".summary.json", summary.as_dict())
    plot_summary(summary.as_dict(), output + ".summary.png")
    for leftover in (progress_path, settings_path):
        os.remove(leftover)
    return summary


def _drop_unfinished(partial: str, done: set) -> None:
    """Remove records of seeds whose batch did not finish (written before an interruption)."""
    if not os.path.exists(partial):
        return
    with open(partial, encoding="utf-8") as f:
        lines = [line for line in f if line.strip() and json.loads(line)["provenance"]["seed_id"] in done]
    with open(partial + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(partial + ".tmp", partial)
