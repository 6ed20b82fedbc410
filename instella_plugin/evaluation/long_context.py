"""Long-context retrieval: needle-in-a-haystack over context lengths x needle depths (``instella eval niah``).

The task (Kamradt's needle in a haystack, in the form RULER uses, Hsieh et al. 2024): a haystack of
filler text holds a needle sentence "One of the special magic numbers for KEY is: VALUE." at a
chosen depth (the fraction of the haystack before it: 0 = start, 1 = end); the prompt ends with the
question for KEY and the start of the answer, and a reply is correct when it contains VALUE.
``multikey`` (RULER's niah_multikey) adds ``distractors`` needles with other keys and values around
the haystack, so the model must pick the right one. Everything is generated locally from the seed:
keys, values, distractor places; the haystack is RULER's repeated "noise" sentences or a text file.

Lengths are prompt lengths in tokens of the model's tokenizer (the prompt is built to within one
filler sentence of the target, never over it). Each (length, depth) cell holds ``samples`` prompts
with fresh needles. Generation runs through the ``TextGenerator`` seam (``inference.api``): greedy,
``max_new_tokens`` tokens. Results: per cell accuracy, per length and overall means, written as JSON
(atomically) and as a depth x length heatmap (PNG). Retention on short context is the ordinary suite
(``instella eval --suite instella-base``).
"""
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from instella_plugin.inference.api import SamplingParams, TextGenerator  # noqa: E402
from instella_plugin.training.progress import save_figure  # noqa: E402

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
VARIANTS = ("single", "multikey")
_KEY_WORDS = ("amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
              "kestrel", "lumen", "meadow", "nectar", "onyx", "pebble", "quartz", "raven", "saffron", "tundra",
              "umber", "violet", "willow", "yarrow", "zephyr", "falcon", "marble", "copper", "lotus", "orchid")


@dataclass(frozen=True)
class NeedleConfig:
    """Which prompts to build. ``lengths`` in tokens; ``depths`` in [0, 1]."""
    lengths: Tuple[int, ...] = (4096, 8192, 16384, 32768, 65536, 131072)
    depths: Tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 4
    variant: str = "single"
    distractors: int = 3
    max_new_tokens: int = 16
    seed: int = 42

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown needle variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if not self.lengths or any(not isinstance(n, int) or n < 64 for n in self.lengths):
            raise ValueError(f"lengths must be integers >= 64 tokens, got {self.lengths!r}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must lie in [0, 1] (0: needle at the start, 1: at the end), got {self.depths!r}")
        if self.samples < 1 or self.max_new_tokens < 1:
            raise ValueError("samples and max_new_tokens must be >= 1")
        if self.variant == "multikey" and not 1 <= self.distractors < len(_KEY_WORDS) - 1:
            raise ValueError(f"multikey needs 1 <= distractors < {len(_KEY_WORDS) - 1}, got {self.distractors}")


@dataclass
class NeedleExample:
    length: int
    depth: float
    prompt: str
    key: str
    answer: str
    prompt_tokens: int
    needle_token: int                                 # where the asked needle starts, in prompt tokens
    distractors: List[Tuple[str, str]] = field(default_factory=list)


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}. "


def _template(key: str) -> Tuple[str, str]:
    head = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
            "I will quiz you about the numbers afterwards.\n")
    tail = (f"\nWhat is the special magic number for {key} mentioned in the provided text? "
            f"The special magic number for {key} mentioned in the provided text is")
    return head, tail


def _sentences(haystack: str) -> List[str]:
    parts = [p.strip() + " " for p in haystack.replace("\n", " ").split(". ") if p.strip()]
    return [p if p.rstrip().endswith(".") else p.rstrip() + ". " for p in parts]


class _Encoder:
    def __init__(self, tokenizer):
        if tokenizer is None or not hasattr(tokenizer, "encode"):
            raise ValueError("needle-in-a-haystack needs the generator's tokenizer to count prompt tokens")
        self.tok = tokenizer

    def __call__(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))


def build_examples(cfg: NeedleConfig, tokenizer, haystack: Optional[str] = None) -> List[NeedleExample]:
    """Every prompt of the grid (lengths x depths x samples), deterministic for ``cfg.seed``."""
    count = _Encoder(tokenizer)
    filler = _sentences(haystack or NOISE)
    if not filler:
        raise ValueError("the haystack text holds no sentences")
    per_sentence = [count(s) for s in filler]
    rng = random.Random(cfg.seed)
    examples = []
    for length in cfg.lengths:
        for depth in cfg.depths:
            for _ in range(cfg.samples):
                keys = rng.sample(_KEY_WORDS, 1 + (cfg.distractors if cfg.variant == "multikey" else 0))
                key, others = keys[0], keys[1:]
                value = str(rng.randint(1_000_000, 9_999_999))
                others = [(k, str(rng.randint(1_000_000, 9_999_999))) for k in others]
                examples.append(_build_one(length, depth, key, value, others, filler, per_sentence, count, rng))
    return examples


def _build_one(length, depth, key, value, others, filler, per_sentence, count, rng) -> NeedleExample:
    """One prompt of ``length`` tokens at most and within one filler sentence of it. Pieces tokenise
    differently alone than in context (BPE merges across the joins), so the haystack size is found by
    measuring whole prompts: a first guess from the average sentence, then corrections."""
    head, tail = _template(key)
    needles = [_needle(key, value)] + [_needle(k, v) for k, v in others]
    spots = [rng.random() for _ in others]  # distractor places as fractions: the same for any haystack size
    fixed = count(head + "".join(needles) + tail)
    longest = max(per_sentence)
    if length - fixed < longest:
        raise ValueError(f"context length {length} is too short for the question and needle(s) ({fixed} tokens); "
                         "use longer lengths")
    cycle = "".join(filler) * 4
    average = count(cycle) / (4 * len(filler))

    def make(k):
        pieces = [filler[i % len(filler)] for i in range(k)]
        inserts = [(round(depth * k), needles[0], 0)] + [(round(f * k), n, 1) for f, n in zip(spots, needles[1:])]
        for pos, text, _ in sorted(inserts, key=lambda x: (x[0], -x[2]), reverse=True):
            pieces.insert(pos, text)
        body = "".join(pieces)
        prompt = head + body + tail
        return prompt, body, count(prompt)

    k = max(0, int((length - fixed) / average))
    prompt, body, n = make(k)
    for _ in range(40):
        if n > length:
            k = max(0, k - max(1, int((n - length) / average)))
        elif length - n >= longest:
            k += max(1, int((length - n) / average) - 1)
        else:
            break
        prompt, body, n = make(k)
    while n > length and k > 0:
        k -= 1
        prompt, body, n = make(k)
    needle_at = body.index(needles[0])
    return NeedleExample(length=length, depth=depth, prompt=prompt, key=key, answer=value, prompt_tokens=n,
                         needle_token=count(head + body[:needle_at]), distractors=list(others))


def is_correct(reply: str, answer: str) -> bool:
    """RULER's string match: the value appears in the reply."""
    return answer in reply


def evaluate_needles(generator: TextGenerator, cfg: NeedleConfig = NeedleConfig(), haystack: Optional[str] = None,
                     batch_size: int = 4, log=print) -> dict:
    """Run the grid; returns the results record (see ``write_results``)."""
    examples = build_examples(cfg, generator.tokenizer, haystack)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, seed=cfg.seed)
    correct: Dict[Tuple[int, float], List[bool]] = {}
    samples = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        replies = generator.generate([e.prompt for e in chunk], params)
        if len(replies) != len(chunk):
            raise RuntimeError(f"the generator returned {len(replies)} completions for {len(chunk)} prompts")
        for e, r in zip(chunk, replies):
            ok = is_correct(r.text, e.answer)
            correct.setdefault((e.length, e.depth), []).append(ok)
            samples.append({"length": e.length, "depth": e.depth, "key": e.key, "answer": e.answer,
                            "reply": r.text, "correct": ok, "prompt_tokens": e.prompt_tokens})
        if log:
            log(f"niah: {min(start + batch_size, len(examples))}/{len(examples)} prompts")
    cells = [{"length": n, "depth": d, "accuracy": sum(v) / len(v), "n": len(v)}
             for (n, d), v in sorted(correct.items())]
    per_length = {str(n): _mean([c["accuracy"] for c in cells if c["length"] == n]) for n in cfg.lengths}
    return {"task": f"niah_{cfg.variant}", "config": asdict(cfg), "cells": cells, "per_length": per_length,
            "accuracy": _mean([c["accuracy"] for c in cells]), "samples": samples}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def accuracy_grid(record: dict) -> Tuple[List[int], List[float], List[List[float]]]:
    """(lengths, depths, grid[depth][length]) of a results record."""
    lengths = sorted({c["length"] for c in record["cells"]})
    depths = sorted({c["depth"] for c in record["cells"]})
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in record["cells"]}
    return lengths, depths, [[acc.get((n, d), math.nan) for n in lengths] for d in depths]


def plot_heatmap(record: dict, path: str, title: Optional[str] = None) -> str:
    """Depth (rows) x length (columns) accuracy heatmap, written atomically as PNG."""
    lengths, depths, grid = accuracy_grid(record)
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 1.8))
    im = ax.imshow([[100 * v for v in row] for row in grid], vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if math.isnan(v) else f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_title(title or f"{record['task']}: {100 * record['accuracy']:.1f}% overall")
    fig.tight_layout()
    save_figure(fig, path, dpi=None)
    return path


def write_results(path: str, record: dict) -> str:
    """The results record as JSON, written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def table(record: dict) -> str:
    lengths, depths, grid = accuracy_grid(record)
    head = "depth  " + " ".join(f"{n:>8}" for n in lengths)
    rows = [f"{100 * d:>4.0f}%  " + " ".join(f"{100 * v:>8.1f}" for v in row) for d, row in zip(depths, grid)]
    mean = "mean   " + " ".join(f"{100 * record['per_length'][str(n)]:>8.1f}" for n in lengths)
    return "\n".join([f"{record['task']} accuracy (%)", head, *rows, mean,
                      f"overall {100 * record['accuracy']:.2f}%"])
