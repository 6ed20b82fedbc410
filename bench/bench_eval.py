"""Multiple-choice scoring throughput: our evaluator vs lm-eval-harness's HF backend, same examples.

One model with random weights (norms 1 + 0.1 N(0,1)) is written as a Hugging Face directory (and,
with ``--megatron``, converted to a Megatron checkpoint); ``--examples`` made-up ARC-style questions
(4 choices) are written in the ARC field layout. Measured side by side in this process, best of
``--repeats`` after a warm-up: lm-eval 0.4.13's ``HFLM`` on its own ``arc_easy`` task YAML pointed
at the file, our evaluator with the HF backend, and (``--megatron``) with the Megatron backend.
Printed: examples/s of each and the ratio ours / lm-eval; the per-example acc and acc_norm of all
are compared (a difference in fp32 fails the run). The last line is ``RESULT PASS|FAIL ...`` for the
GPU check script. Results are appended to ``--out`` (bench/results/eval.json) and plotted (eval.png).

    python bench/bench_eval.py                                   # CPU: instella-tiny, fp32
    python bench/bench_eval.py --preset instella-1b --dtype bfloat16 --examples 2000 --megatron   # one GPU
"""
import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))

from instella_plugin.megatron_import import import_megatron_core  # noqa: E402

import_megatron_core()

import torch  # noqa: E402

from instella_plugin.evaluation.hf_backend import HFBackend  # noqa: E402
from instella_plugin.evaluation.runner import evaluate  # noqa: E402
from instella_plugin.evaluation.task_config import load_task  # noqa: E402
from instella_plugin.hf import formats  # noqa: E402
from instella_plugin.hf.convert import hf_to_megatron  # noqa: E402
from instella_plugin.hf.outputs import write_json  # noqa: E402
from instella_plugin.hf.safetensors_io import ShardedWriter  # noqa: E402
from instella_plugin.hf.tokenizer_files import write_tokenizer_files  # noqa: E402
from instella_plugin.model.config import get_preset  # noqa: E402
from instella_plugin.testing.olmoe_reference import random_hf_weights  # noqa: E402

WORDS = "river stone cloud lamp garden engine window pepper violin copper meadow rocket candle falcon".split()


def write_model(path, preset, dtype):
    cfg = get_preset(preset, seq_length=2048)
    weights = random_hf_weights(cfg, seed=1)
    os.makedirs(path, exist_ok=True)
    plan = formats.export_plan(cfg, "instella", dtype)
    writer = ShardedWriter(path, plan)
    by_file = {formats.file_name(n, "instella"): n for n in weights}
    for name, _, _ in plan:
        writer.write(name, weights[by_file[name]].to(dtype))
    writer.finish()
    write_json(os.path.join(path, "config.json"), formats.config_json(cfg, "instella", rope_theta=cfg.rotary_base,
                                                                      max_positions=cfg.seq_length, dtype=dtype))
    write_tokenizer_files(path, None, max_length=cfg.seq_length)


def write_examples(path, n, seed=0):
    rng = random.Random(seed)
    phrase = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "question": f"Which {phrase(rng.randint(4, 30))}?",
                                "choices": {"text": [phrase(rng.randint(1, 8)) for _ in range(4)],
                                            "label": list("ABCD")}, "answerKey": rng.choice("ABCD")}) + "\n")


def lm_eval_scores(model_dir, data_file, folder, batch_size, dtype, device):
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with open(os.path.join(folder, "b_arc.yaml"), "w") as f:
        f.write(f"include: {lm_eval.__path__[0]}/tasks/arc/arc_easy.yaml\ntask: b_arc\ntag: []\n"
                f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {data_file}\n"
                "training_split: null\nvalidation_split: null\n")
    lm = HFLM(pretrained=model_dir, dtype=dtype, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=folder, include_defaults=False)

    def run():
        out = simple_evaluate(model=lm, tasks=["b_arc"], num_fewshot=0, task_manager=manager, log_samples=True,
                              verbosity="ERROR")
        return [(s["acc"], s["acc_norm"]) for s in sorted(out["samples"]["b_arc"], key=lambda s: s["doc_id"])]
    return run


def ours_scores(backend, data_dir):
    task = load_task("arc_easy")

    def run():
        samples = evaluate([task], backend, data_dir)["samples"]["arc_easy"]
        return [(s["metrics"]["acc"], s["metrics"]["acc_norm"]) for s in samples]
    return run


def best_time(fn, repeats, device):
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="instella-tiny")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--megatron", action="store_true", help="also time the Megatron backend (TP=1)")
    p.add_argument("--out", default=os.path.join(RESULTS, "eval.json"), help="results JSON (appended)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    work = tempfile.mkdtemp(prefix="bench_eval_")
    model_dir, data_dir = os.path.join(work, "hf"), os.path.join(work, "data")
    data_file = os.path.join(data_dir, "allenai/ai2_arc/ARC-Easy/test.jsonl")
    write_model(model_dir, args.preset, dtype)
    write_examples(data_file, args.examples)
    timings = {}
    timings["lm-eval HFLM"] = best_time(lm_eval_scores(model_dir, data_file, work, args.batch_size, args.dtype,
                                                       device), args.repeats, device)
    timings["ours (HF)"] = best_time(ours_scores(HFBackend(model_dir, args.dtype, args.batch_size, device), data_dir),
                                     args.repeats, device)
    if args.megatron:
        from instella_plugin.evaluation.megatron_backend import MegatronBackend

        hf_to_megatron(model_dir, os.path.join(work, "ckpt"))
        backend = MegatronBackend(os.path.join(work, "ckpt"), dtype=args.dtype, batch_size=args.batch_size)
        timings["ours (Megatron)"] = best_time(ours_scores(backend, data_dir), args.repeats, device)
    base_s, base = timings["lm-eval HFLM"]
    rows, status = [], "PASS"
    for name, (secs, scores) in timings.items():
        same = sum(a == b for a, b in zip(scores, base))
        if same != len(base) and args.dtype == "float32":
            status = "FAIL"
        row = dict(backend=name, preset=args.preset, dtype=args.dtype, device=device, examples=args.examples,
                   batch_size=args.batch_size, examples_per_s=args.examples / secs, ratio_vs_lm_eval=base_s / secs,
                   same_as_lm_eval=f"{same}/{len(base)}", host=platform.node(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        rows.append(row)
        print(f"{name:16s} {row['examples_per_s']:8.1f} examples/s   ratio vs lm-eval {row['ratio_vs_lm_eval']:.2f}x   "
              f"same acc/acc_norm {row['same_as_lm_eval']}", flush=True)
    if not args.no_save:
        save(rows, args.out)
    print(f"RESULT {status} " + "; ".join(f"{r['backend']}: {r['ratio_vs_lm_eval']:.2f}x lm-eval "
                                         f"({r['examples_per_s']:.1f} examples/s), same {r['same_as_lm_eval']}"
                                         for r in rows))
    return 1 if status == "FAIL" else 0


def save(rows, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    old = json.load(open(path)) if os.path.isfile(path) else []
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(old + rows, f, indent=1)
    os.replace(tmp, path)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["backend"] for r in rows], [r["examples_per_s"] for r in rows])
    ax.set_ylabel("examples/s")
    ax.set_title(f"multiple-choice scoring, {rows[0]['preset']} {rows[0]['dtype']} on {rows[0]['device']}")
    fig.tight_layout()
    tmp = os.path.splitext(path)[0] + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, os.path.splitext(path)[0] + ".png")


if __name__ == "__main__":
    sys.exit(main())
