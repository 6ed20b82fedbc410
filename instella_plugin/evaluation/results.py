"""Results of a run: the terminal table, the JSON file (written atomically) and reading runs back.

The JSON holds per-task metrics with standard errors, example counts, task versions, shot counts
and seeds, plus the model and its layout; per-example records only when asked (``--log-samples``).
"""
import datetime
import json
import math
import os
from typing import Dict, List

from instella_plugin.hf.outputs import write_json

FORMAT_VERSION = 1


def run_record(evaluated: dict, model: dict, limit, log_samples: bool) -> dict:
    record = {"format_version": FORMAT_VERSION, "model": model, "limit": limit,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "results": evaluated["results"]}
    if log_samples:
        record["samples"] = evaluated["samples"]
    return record


def write_results(path: str, record: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    write_json(path, record)


def read_results(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"results file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a results JSON: {e}") from None
    if not isinstance(record, dict) or "results" not in record:
        raise ValueError(f"{path} has no 'results': not written by `instella eval`")
    return record


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def table(results: Dict[str, dict]) -> str:
    """One line per task and metric: value and standard error in percent, shots, examples."""
    rows = [("task", "metric", "value", "stderr", "shots", "n")]
    for name, r in results.items():
        for m in (k for k in r["metrics"] if not k.endswith("_stderr")):
            star = "*" if m == r["primary_metric"] else ""
            rows.append((name, m + star, _fmt(r["metrics"][m]), _fmt(r["metrics"][f"{m}_stderr"]),
                         str(r["num_fewshot"]), str(r["n"])))
    primary = [r["metrics"][r["primary_metric"]] for r in results.values()]
    if len(primary) > 1:
        rows.append(("average", "primary*", _fmt(sum(primary) / len(primary)), "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def primary_scores(record: dict) -> Dict[str, float]:
    return {name: r["metrics"][r["primary_metric"]] for name, r in record["results"].items()}


def compare_table(names: List[str], records: List[dict]) -> str:
    tasks = []
    for rec in records:
        tasks += [t for t in rec["results"] if t not in tasks]
    scores = [primary_scores(r) for r in records]
    rows = [("task",) + tuple(names)]
    for t in tasks:
        rows.append((t,) + tuple(_fmt(s.get(t)) if t in s else "-" for s in scores))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)
