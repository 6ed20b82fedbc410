"""The RoPE-method ablation's table and plot (``examples/rope_ablation.sh`` writes the runs it reads).

For each method directory ``WORK/METHOD/``: ``niah/niah_*.json`` (``instella eval niah`` at the target
length: retrieval), ``short/train_log.jsonl`` (the validation loss at the original context after the
extension: retention) and, when the short suite was run, ``short_suite.json`` (``instella eval
--suite``: retention on the benchmarks). Writes ``WORK/rope_ablation.json`` and ``rope_ablation.png``
(retrieval and retention side by side) and prints the table.

    python -m instella_plugin.evaluation.rope_ablation WORK [--methods base-law,linear,ntk,yarn]
"""
import argparse
import glob
import json
import math
import os
import sys
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from instella_plugin.evaluation.long_context import write_results  # noqa: E402
from instella_plugin.evaluation.results import primary_scores, read_results  # noqa: E402
from instella_plugin.rope.methods import METHODS  # noqa: E402
from instella_plugin.training.progress import save_figure  # noqa: E402


def _last_eval_loss(log_path: str) -> Optional[float]:
    if not os.path.isfile(log_path):
        return None
    loss = None
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record.get("eval_loss") is not None:
                loss = float(record["eval_loss"])
    return loss


def collect(work: str, methods: List[str]) -> List[Dict]:
    """One row per method: retrieval accuracy (overall and per length), short-context loss, suite mean."""
    rows = []
    for method in methods:
        folder = os.path.join(work, method)
        found = sorted(glob.glob(os.path.join(folder, "niah", "niah_*.json")))
        if not found:
            raise FileNotFoundError(f"{folder}/niah/ holds no niah_*.json: run `instella eval niah` for {method}")
        with open(found[0], encoding="utf-8") as f:
            niah = json.load(f)
        suite_path = os.path.join(folder, "short_suite.json")
        suite = primary_scores(read_results(suite_path)) if os.path.isfile(suite_path) else {}
        rows.append({"method": method, "niah": niah["accuracy"], "niah_per_length": niah["per_length"],
                     "short_loss": _last_eval_loss(os.path.join(folder, "short", "train_log.jsonl")),
                     "short_suite": (sum(suite.values()) / len(suite)) if suite else None})
    return rows


def _fmt(x, pct=False):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.4f}"


def table(rows: List[Dict]) -> str:
    lengths = sorted({int(n) for r in rows for n in r["niah_per_length"]})
    head = f"{'method':<10} {'niah %':>8} " + " ".join(f"{f'@{n}':>9}" for n in lengths) + \
        f" {'short loss':>11} {'short suite %':>14}"
    lines = ["RoPE method ablation: retrieval at the target length, retention at the original context",
             head, "-" * len(head)]
    for r in rows:
        per = " ".join(f"{_fmt(r['niah_per_length'].get(str(n)), True):>9}" for n in lengths)
        lines.append(f"{r['method']:<10} {_fmt(r['niah'], True):>8} {per} {_fmt(r['short_loss']):>11} "
                     f"{_fmt(r['short_suite'], True):>14}")
    return "\n".join(lines)


def plot(rows: List[Dict], path: str) -> str:
    """Retrieval accuracy (left) and short-context loss (right) per method, written atomically."""
    names = [r["method"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(names, [100 * r["niah"] for r in rows], color="tab:green")
    a.set_ylim(0, 100)
    a.set_ylabel("needle retrieval (%)")
    a.set_title("retrieval at the target length")
    losses = [r["short_loss"] if r["short_loss"] is not None else math.nan for r in rows]
    b.bar(names, losses, color="tab:blue")
    b.set_ylabel("validation loss")
    b.set_title("retention at the original context")
    fig.tight_layout()
    save_figure(fig, path, dpi=None)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m instella_plugin.evaluation.rope_ablation",
                                description=__doc__.splitlines()[0])
    p.add_argument("work", help="the ablation's work directory (one folder per method)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods, in table order")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown RoPE method(s) {unknown}; choose from {', '.join(METHODS)}")
    try:
        rows = collect(args.work, methods)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(table(rows))
    out = write_results(os.path.join(args.work, "rope_ablation.json"), {"rows": rows})
    print(f"wrote {out} and {plot(rows, os.path.join(args.work, 'rope_ablation.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
