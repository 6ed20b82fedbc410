"""Greedy soup (Wortsman et al. 2022, "Model soups", Recipe 1): add checkpoints while the score holds.

Inputs are ranked by their own score (best first). The soup starts as the best input; each next input
is tried as one more ingredient of the uniform mean and kept when the soup's score is not worse
(``<=`` for a loss, ``>=`` for a score). Every candidate soup is written to a scratch directory beside
the output and scored by the evaluator (``merge_eval``: held-out loss, or any command's number), then
removed. The result is the uniform mean of the kept ingredients, written like any merge (atomically,
streaming), with the scores and decisions in its record.
"""
import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Sequence

from instella_plugin.hf.merge import checkpoint_kind, merge
from instella_plugin.hf.merge_config import MergeSpec
from instella_plugin.hf.merge_eval import better
from instella_plugin.hf.outputs import check_output


def soup_spec(inputs: Sequence[str], ingredients: Sequence[str], dtype: Optional[str] = None) -> MergeSpec:
    """The uniform mean of ``ingredients`` as weights over all inputs (the rest get 0 and are not read)."""
    chosen = set(ingredients)
    return MergeSpec("weighted", list(inputs), weights=[1.0 if p in chosen else 0.0 for p in inputs],
                     dtype=dtype).check()


def greedy_soup(inputs: Sequence[str], out: str, evaluator: Callable[[str], float], *,
                scores: Optional[Dict[str, float]] = None, dtype=None, overwrite: bool = False,
                workdir: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Write the greedy soup of ``inputs`` to ``out``; return its record (order, scores, steps).

    ``scores``: the inputs' scores when already known (the report computes them once)."""
    inputs = list(inputs)
    MergeSpec("greedy-soup", inputs).check()
    checkpoint_kind(inputs)
    check_output(out, overwrite, inputs=inputs)
    hib = getattr(evaluator, "higher_is_better", False)
    scores = dict(scores or {})
    for i, p in enumerate(inputs):
        if p not in scores:
            t = time.time()
            scores[p] = evaluator(p)
            log(f"greedy soup: input {i + 1}/{len(inputs)} {p}: {scores[p]:.4f} ({time.time() - t:.1f}s)")
    order = sorted(inputs, key=lambda p: -scores[p] if hib else scores[p])
    soup, best = [order[0]], scores[order[0]]
    steps: List[dict] = [{"add": order[0], "score": best, "kept": True}]
    work = workdir or f"{os.path.abspath(out)}.soup-{os.getpid()}"
    try:
        for k, cand in enumerate(order[1:], start=1):
            trial = os.path.join(work, f"candidate_{k}")
            merge(inputs, trial, spec=soup_spec(inputs, soup + [cand]), overwrite=True)
            t = time.time()
            s = evaluator(trial)
            kept = better(s, best, hib)
            log(f"greedy soup: + {cand}: {s:.4f} vs {best:.4f} -> {'kept' if kept else 'dropped'} "
                f"({time.time() - t:.1f}s)")
            steps.append({"add": cand, "score": s, "kept": kept})
            if kept:
                soup, best = soup + [cand], s
            shutil.rmtree(trial, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {"method": "greedy-soup", "greedy_soup": {
        "evaluator": getattr(evaluator, "name", type(evaluator).__name__), "higher_is_better": hib,
        "input_scores": {os.path.abspath(p): scores[p] for p in inputs},
        "order": [os.path.abspath(p) for p in order], "steps": steps,
        "ingredients": [os.path.abspath(p) for p in soup], "score": best}}
    merge(inputs, out, dtype=dtype, overwrite=overwrite, spec=soup_spec(inputs, soup), record_extra=record)
    return record["greedy_soup"]
