"""Benchmark ``instella data prepare`` against the bare tokenizer on the same text, in one run.

Baseline: the Instella tokenizer's Rust ``encode_batch`` over the documents already in memory, in the
same chunk size prepare uses (no reading, no JSON, no EOS, no writing). Measured: ``prepare`` from
the JSONL file to a committed ``.bin``/``.idx`` pair with ``--workers 1`` (and more workers, for
reference). Both run with ``TOKENIZERS_PARALLELISM=false``; best of ``--repeats``. Prints tokens/s, the
ratio and the pipeline overhead by wall and by CPU time (target: under 25%; CPU time is the steadier
figure on a loaded machine), appends to bench/results/prepare.json and plots
bench/results/prepare.png. Runs are interleaved and the best of each kind is kept, to damp load
from other processes on a shared machine.

    python bench/bench_prepare.py              # ~8 MB of text
    python bench/bench_prepare.py --mb 2       # quicker
"""
import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from instella_plugin.data.prepare import prepare  # noqa: E402
from instella_plugin.data.tokenizer import load_tokenizer  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STORY = os.path.join(os.path.dirname(RESULTS), "..", "instella_plugin", "data", "fixtures", "tiny_story.txt")


def make_corpus(megabytes: float, seed: int = 0):
    """Web-like documents: story sentences shuffled with numbers, code, punctuation and unicode."""
    rng = random.Random(seed)
    sentences = open(STORY, encoding="utf-8").read().replace("\n", " ").split(". ")
    extras = ["def add(a, b):\n    return a + b\n", "The price rose 3.5% to $1,204.17 in Q3 2024.",
              "Übersetzung: naïve café — 日本語のテキスト。", "https://example.com/a?b=1&c=2", "x = [i**2 for i in range(10)]"]
    docs, size = [], 0
    while size < megabytes * 1e6:
        parts = [rng.choice(sentences) + "." for _ in range(rng.randrange(3, 40))]
        parts += [rng.choice(extras) for _ in range(rng.randrange(0, 4))]
        rng.shuffle(parts)
        doc = " ".join(parts)
        docs.append(doc)
        size += len(doc.encode())
    return docs


def bare_encode(tok, docs, chunk):
    backend = tok.backend_tokenizer
    t, c = time.perf_counter(), time.process_time()
    n = 0
    for i in range(0, len(docs), chunk):
        n += sum(len(e.ids) for e in backend.encode_batch(docs[i:i + chunk], add_special_tokens=False))
    return n, time.perf_counter() - t, time.process_time() - c


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8.0, help="megabytes of text")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="*", default=[2], help="extra worker counts to time")
    args = ap.parse_args()
    tok = load_tokenizer()
    docs = make_corpus(args.mb)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "corpus.jsonl")
        with open(src, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        bare_encode(tok, docs[:200], 512)  # warm-up
        runs = {}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
            runs.setdefault("bare encode_batch", []).append(bare_encode(tok, docs, 512))
            for w in [1] + [w for w in args.workers if w != 1]:
                c = time.process_time()  # this process only: all of the work when w == 1
                s = prepare(src, os.path.join(tmp, f"out{w}"), tok, workers=w, progress=False, overwrite=True)
                runs.setdefault(f"prepare --workers {w}", []).append(
                    (s.tokens - s.documents, s.seconds, time.process_time() - c if w == 1 else float("nan")))  # no EOS
        rows = {k: min(v, key=lambda r: r[1]) for k, v in runs.items()}
    base_tps = rows["bare encode_batch"][0] / rows["bare encode_batch"][1]
    print(f"{len(docs):,} documents, {sum(len(d.encode()) for d in docs) / 1e6:.1f} MB of text, "
          f"cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, TOKENIZERS_PARALLELISM=false")
    print(f"{'what':<24} {'tokens':>12} {'seconds':>9} {'cpu s':>7} {'tokens/s':>12} {'vs bare':>8}")
    for name, (n, sec, cpu) in rows.items():
        print(f"{name:<24} {n:>12,} {sec:>9.2f} {cpu:>7.2f} {n / sec:>12,.0f} {n / sec / base_tps:>8.3f}")
    w1, bare = rows["prepare --workers 1"], rows["bare encode_batch"]
    overhead = 1 - (w1[0] / w1[1]) / base_tps
    overhead_cpu = w1[2] / bare[2] - 1
    print(f"prepare --workers 1 pipeline overhead: {overhead * 100:.1f}% by wall time, {overhead_cpu * 100:.1f}% by CPU "
          f"time (target < 25%)")
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
              "documents": len(docs), "megabytes": args.mb,
              "tokens_per_s": {k: r[0] / r[1] for k, r in rows.items()}, "overhead_workers1": overhead,
              "overhead_workers1_cpu": overhead_cpu}
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "prepare.json")
    history = json.load(open(path)) if os.path.exists(path) else []
    history.append(record)
    with open(path + ".tmp", "w") as f:
        json.dump(history, f, indent=1)
    os.replace(path + ".tmp", path)
    plot(history, os.path.join(RESULTS, "prepare.png"))
    return 0


def plot(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = history[-1]["tokens_per_s"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.barh(list(last), [v / 1e3 for v in last.values()], color=["grey"] + ["tab:blue"] * (len(last) - 1))
    ax.set_xlabel("thousand tokens / s (higher is better)")
    ax.set_title(f"instella data prepare vs bare encode_batch ({history[-1]['cpus']} CPUs)")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)


if __name__ == "__main__":
    sys.exit(main())
