"""The seed-soup report: how each merge method scores against its inputs, and the loss barrier between them.

For N inputs (e.g. Instella's three stage-2 seeds) and an optional base (the stage-1 checkpoint the
task-vector methods need), with one evaluator (``merge_eval``):

1. every input is scored (and the base, as a reference row);
2. every method of the method list (``merge_report.yaml`` by default) is merged into a scratch
   directory, scored, and removed; greedy soup reuses the inputs' scores;
3. for every pair of inputs, ``points`` checkpoints on the straight line between them
   (``(1 - t) A + t B``, t evenly spaced in [0, 1]) are scored. The barrier height of a pair is
   ``max_t [loss(t) - ((1 - t) loss(0) + t loss(1))]`` over the interior points (Frankle et al. 2020,
   linear mode connectivity): near zero or negative when the two sit in one basin.

Every specification is built and checked before the first evaluation. Written atomically into the
output directory: ``report.md`` (the tables), ``report.json`` (every number), ``methods.png`` (score
per method against the inputs) and ``barrier.png`` (the curves).
"""
import itertools
import json
import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Sequence

import yaml

from instella_plugin.hf.merge import checkpoint_kind, merge
from instella_plugin.hf.merge_config import MergeConfigError, MergeSpec, build_spec
from instella_plugin.hf.merge_soup import greedy_soup
from instella_plugin.hf.outputs import atomic_output, check_output, write_json

DEFAULT_METHODS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "merge_report.yaml")


def load_methods(path: Optional[str] = None, select: Optional[Sequence[str]] = None) -> Dict[str, dict]:
    """{label: entry} from a method-list YAML (default: the bundled one), optionally a subset."""
    path = path or DEFAULT_METHODS
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    methods = data.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise MergeConfigError(f"{path}: a method list is a mapping `methods: {{label: {{merge_method: ...}}}}`")
    if select:
        unknown = [s for s in select if s not in methods]
        if unknown:
            raise MergeConfigError(f"--methods {unknown} are not in {path}; known: {', '.join(methods)}")
        methods = {k: methods[k] for k in select}
    return methods


def method_spec(label: str, entry: dict, inputs: Sequence[str], base: Optional[str]) -> Optional[MergeSpec]:
    """The checked spec of one report entry for these inputs; None for a task-vector method without a base."""
    stray = sorted(set(entry) - {"merge_method", "parameters", "inputs", "weights"})
    if stray or "merge_method" not in entry:
        raise MergeConfigError(f"method {label}: an entry has merge_method and optionally parameters, inputs "
                               f"(pair), weights; got {sorted(entry)}")
    method, params = entry["merge_method"], dict(entry.get("parameters") or {})
    ins = list(inputs[:2]) if entry.get("inputs") == "pair" else list(inputs)
    weights = entry.get("weights")
    if isinstance(weights, dict):
        weights = [weights["first"]] + [weights.get("rest", 1.0)] * (len(ins) - 2) + [weights["last"]]
    task_vector = method in ("ties", "dare", "dare_linear", "dare_ties")
    if task_vector and not base:
        return None
    density = params.pop("density", None)
    try:
        return build_spec(method, ins, weights=weights, base=base if task_vector else None,
                          density=None if density is None else [density], t=params.pop("t", None),
                          lam=params.pop("lambda", None), normalize=params.pop("normalize", None),
                          combine=params.pop("combine", None), rescale=params.pop("rescale", None),
                          seed=params.pop("seed", None))
    except MergeConfigError as e:
        raise MergeConfigError(f"method {label}: {e}") from None


def barrier_height(ts: Sequence[float], losses: Sequence[float]) -> float:
    """max over the interior points of the loss above the straight line between the end points: positive
    for a bump between the two, negative when every interpolated point lies below the chord."""
    excess = [l - ((1 - t) * losses[0] + t * losses[-1]) for t, l in zip(ts, losses)]
    return max(excess[1:-1]) if len(excess) > 2 else 0.0


def seed_soup_report(inputs: Sequence[str], out: str, evaluator: Callable[[str], float], *,
                     base: Optional[str] = None, methods: Optional[Dict[str, dict]] = None, points: int = 5,
                     overwrite: bool = False, workdir: Optional[str] = None,
                     log: Callable[[str], None] = print) -> dict:
    inputs = list(inputs)
    methods = methods if methods is not None else load_methods()
    if points < 2:
        raise MergeConfigError(f"--points {points}: the barrier needs at least the two end points")
    specs = {label: method_spec(label, entry, inputs, base) for label, entry in methods.items()}
    MergeSpec("uniform", inputs).check()
    checkpoint_kind(inputs + ([base] if base else []))
    check_output(out, overwrite, inputs=inputs + ([base] if base else []))
    hib = getattr(evaluator, "higher_is_better", False)
    work = workdir or f"{os.path.abspath(out)}.work-{os.getpid()}"
    os.makedirs(work, exist_ok=True)
    start = time.time()
    jobs = len(inputs) + bool(base) + len(specs) + len(list(itertools.combinations(inputs, 2))) * (points - 2)
    done = [0]

    def score(label: str, path: str) -> float:
        t = time.time()
        s = evaluator(path)
        done[0] += 1
        eta = (time.time() - start) / done[0] * (jobs - done[0])
        log(f"[{done[0]}/{jobs}] {label}: {getattr(evaluator, 'name', 'score')} {s:.4f} "
            f"({time.time() - t:.1f}s, ETA {eta:.0f}s)")
        return s

    try:
        input_scores = {p: score(f"input {os.path.basename(os.path.normpath(p))}", p) for p in inputs}
        base_score = score("base", base) if base else None
        rows: Dict[str, dict] = {}
        for label, spec in specs.items():
            if spec is None:
                rows[label] = {"score": None, "note": "needs --base"}
                log(f"{label}: skipped (needs --base)")
                continue
            path = os.path.join(work, label)
            if spec.method == "greedy-soup":
                soup = greedy_soup(inputs, path, evaluator, scores=input_scores, overwrite=True,
                                   workdir=os.path.join(work, "soup-candidates"), log=log)
                rows[label] = {"score": soup["score"], "note": f"{len(soup['ingredients'])} of {len(inputs)} kept"}
                done[0] += 1
            else:
                merge(spec.inputs, path, spec=spec, overwrite=True)
                rows[label] = {"score": score(label, path), "note": _describe(spec)}
            shutil.rmtree(path, ignore_errors=True)
        ts = [i / (points - 1) for i in range(points)]
        barriers = []
        for a, b in itertools.combinations(inputs, 2):
            curve = []
            for t in ts:
                if t in (0.0, 1.0):
                    curve.append(input_scores[a if t == 0.0 else b])
                    continue
                path = os.path.join(work, "interpolation")
                merge([a, b], path, spec=MergeSpec("weighted", [a, b], weights=[1 - t, t]).check(), overwrite=True)
                curve.append(score(f"{_short(a)} -> {_short(b)} t={t:.2f}", path))
                shutil.rmtree(path, ignore_errors=True)
            barriers.append({"a": a, "b": b, "t": ts, "scores": curve,  # for a score: the dip below the line
                             "barrier": barrier_height(ts, [-c for c in curve] if hib else curve)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"evaluator": getattr(evaluator, "name", "score"), "higher_is_better": hib,
              "inputs": {p: input_scores[p] for p in inputs}, "base": {"path": base, "score": base_score},
              "methods": rows, "barriers": barriers, "points": points, "seconds": round(time.time() - start, 1)}
    scored = {k: v["score"] for k, v in rows.items() if v["score"] is not None}
    best_input = (max if hib else min)(input_scores.values())
    report["best_method"] = (max if hib else min)(scored, key=scored.get) if scored else None
    report["best_input"] = best_input
    with atomic_output(out, overwrite) as tmp:
        write_json(os.path.join(tmp, "report.json"), report)
        with open(os.path.join(tmp, "report.md"), "w", encoding="utf-8") as f:
            f.write(markdown(report))
        plot_methods(report, os.path.join(tmp, "methods.png"))
        plot_barriers(report, os.path.join(tmp, "barrier.png"))
    return report


def _short(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def _describe(spec: MergeSpec) -> str:
    rec = spec.record()
    keep = {k: v for k, v in rec.items() if k in ("t", "density", "lambda", "combine", "rescale", "seed")}
    if spec.method == "layerwise":
        keep["weights"] = rec["weights"]
    if "density" in keep:
        keep["density"] = sorted(set(keep["density"]))[0] if len(set(keep["density"])) == 1 else keep["density"]
    return ", ".join(f"{k} {v}" for k, v in keep.items())


def markdown(report: dict) -> str:
    """The report's tables: score per input and method (difference to the best input), barrier per pair."""
    name, hib = report["evaluator"], report["higher_is_better"]
    best = report["best_input"]
    mean_inputs = sum(report["inputs"].values()) / len(report["inputs"])
    lines = [f"# Seed-soup report ({name}, {'higher' if hib else 'lower'} is better)", "",
             f"| checkpoint | {name} | vs best input | vs mean of inputs | notes |", "|---|---:|---:|---:|---|"]
    for p, s in report["inputs"].items():
        lines.append(f"| input {_short(p)} | {s:.4f} | {s - best:+.4f} | {s - mean_inputs:+.4f} | {p} |")
    if report["base"]["path"]:
        s = report["base"]["score"]
        lines.append(f"| base {_short(report['base']['path'])} | {s:.4f} | {s - best:+.4f} | {s - mean_inputs:+.4f} "
                     "| reference |")
    for label, row in report["methods"].items():
        s = row["score"]
        cells = "| - | - | -" if s is None else f"| {s:.4f} | {s - best:+.4f} | {s - mean_inputs:+.4f}"
        win = " **best**" if label == report["best_method"] else ""
        lines.append(f"| {label}{win} {cells} | {row['note']} |")
    lines += ["", f"## Interpolation barrier ({report['points']} points per pair)", "",
              "| pair | " + " | ".join(f"t={t:.2f}" for t in report["barriers"][0]["t"]) + " | barrier |",
              "|---|" + "---:|" * (len(report["barriers"][0]["t"]) + 1)] if report["barriers"] else []
    for b in report["barriers"]:
        lines.append(f"| {_short(b['a'])} -> {_short(b['b'])} | " + " | ".join(f"{s:.4f}" for s in b["scores"])
                     + f" | {b['barrier']:+.4f} |")
    lines += ["", f"Best method: {report['best_method']}; best input {best:.4f}. Barrier: the largest excess of "
              "the interpolated loss over the straight line between the end points, over the interior points "
              "(positive: a bump between them; negative: the path lies below the chord).",
              ""]
    return "\n".join(lines)


def plot_methods(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"input {_short(p)}" for p in report["inputs"]] + [k for k, v in report["methods"].items()
                                                                   if v["score"] is not None]
    values = list(report["inputs"].values()) + [v["score"] for v in report["methods"].values() if v["score"] is not None]
    colors = ["tab:gray"] * len(report["inputs"]) + ["tab:blue"] * (len(values) - len(report["inputs"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels)), 4))
    ax.bar(labels, values, color=colors)
    ax.axhline(report["best_input"], color="tab:red", lw=1, ls="--", label="best input")
    lo, hi = min(values), max(values)
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-6) - 1e-3, hi + 0.1 * (hi - lo + 1e-6) + 1e-3)
    ax.set_ylabel(report["evaluator"])
    ax.set_title("merge methods against their inputs")
    ax.legend()
    plt.xticks(rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_barriers(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for b in report["barriers"]:
        ax.plot(b["t"], b["scores"], marker="o", label=f"{_short(b['a'])} -> {_short(b['b'])} "
                                                       f"(barrier {b['barrier']:+.3f})")
    ax.set_xlabel("t (0: first checkpoint, 1: second)")
    ax.set_ylabel(report["evaluator"])
    ax.set_title("interpolation between pairs of inputs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
