"""Run the benchmarks: every ``bench/bench_*.py`` (``make bench``), or the ones named.

    python bench/run_all.py                    # all of them, in name order
    python bench/run_all.py trainer prepare    # a subset (``trainer``, ``bench_trainer`` or ``bench_trainer.py``)
    python bench/run_all.py --list             # what there is

Each benchmark runs in its own process with this Python, from the repository root, with its default
settings; its output passes through. Each prints its own table and appends to ``bench/results/``.
At the end one line per benchmark gives its exit status and time; the exit status is non-zero when
any failed (the rest still run).
"""
import argparse
import glob
import os
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)


def discover() -> dict:
    """{short name: path} of every bench/bench_*.py."""
    return {os.path.basename(p)[len("bench_"):-len(".py")]: p for p in sorted(glob.glob(os.path.join(BENCH, "bench_*.py")))}


def select(names, found: dict) -> list:
    if not names:
        return list(found)
    chosen = []
    for n in names:
        key = os.path.basename(n)
        key = key[:-3] if key.endswith(".py") else key
        key = key[len("bench_"):] if key.startswith("bench_") else key
        if key not in found:
            raise SystemExit(f"error: unknown benchmark {n!r}; known: {', '.join(found)}")
        if key not in chosen:
            chosen.append(key)
    return chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    a = ap.parse_args(argv)
    found = discover()
    if a.list:
        for name, path in found.items():
            print(f"{name:<16} {os.path.relpath(path, ROOT)}")
        return 0
    chosen = select(a.names, found)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    outcomes = []
    for name in chosen:
        print(f"===== {name} ({os.path.relpath(found[name], ROOT)}) =====", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, found[name]], cwd=ROOT, env=env)
        outcomes.append((name, rc, time.time() - t0))
    print("\n===== summary =====")
    for name, rc, dt in outcomes:
        print(f"{'ok  ' if rc == 0 else 'FAIL'} {name:<16} {dt:7.1f} s" + ("" if rc == 0 else f"  (exit {rc})"))
    return 1 if any(rc for _, rc, _ in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
