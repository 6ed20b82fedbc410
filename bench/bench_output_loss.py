"""The output layer + loss alone, and one trainer step: time and peak memory, megatron's path vs the fused one.

Part 1 (``--part op``), one process, TP=1: forward + backward of the output layer and the loss at
the trainer benchmark's shape (micro-batch 2 x seq 1024 tokens, hidden 1024, vocabulary 50304,
fp32) for: megatron's ``ColumnParallelLinear`` + ``vocab_parallel_cross_entropy`` (what GPTModel
runs), the plain PyTorch loop's ``Linear`` + ``F.cross_entropy`` (bench_trainer's baseline (b)),
and the fused path at several chunk sizes. Part 2 (``--part step``): one trainer step (bench_trainer's
``MegatronVariant``, the trainer's own iteration) with ``--no-fused-output-loss`` and
``--fused-output-loss``, timed per phase (forward-backward schedule, optimizer), and its peak memory.

Peak memory is the process's resident high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) above the resident size just before the measured call: the transient
memory the call needs. Timings on a shared machine are noisy: medians of ``--reps``.
Appends to bench/results/output_loss.json.

    python bench/bench_output_loss.py --part op --reps 3
    python bench/bench_output_loss.py --part step --layers 2 --reps 1
    python bench/bench_output_loss.py --part op --device cuda --dtype bf16 --mbs 4 --seq 4096 --hidden 2560

The op part ends with a ``RESULT PASS|FAIL`` line (for tests/gpu/run_gpu_checks.sh): PASS when the
fused path's peak is below megatron's by at least the fp32 logits in bf16 (megatron holds the bf16
logits or their gradient beside the fp32 ones), by the fp32 logits less two chunks' in fp32 (megatron's
loss turns the fp32 logits into their gradient in place: one buffer).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench_trainer import add_shape_args  # noqa: E402  (the benchmarks share the shape flags)

RESULTS = os.path.join(ROOT, "bench", "results")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(fn, reps: int, device: str = "cpu"):
    """(median wall seconds, median process CPU seconds, peak MiB above the memory in use before the
    call) over ``reps`` calls. CPU time is less sensitive than wall time to other users' load. On CPU
    the memory is the resident size (``VmHWM`` reset through ``/proc/self/clear_refs``); on a GPU,
    the caching allocator's peak of allocated bytes."""
    times, cpu, peaks = [], [], []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 1024
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident size
            before = _rss_kib("VmRSS")
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        peak = torch.cuda.max_memory_allocated() / 1024 if device == "cuda" else _rss_kib("VmHWM")
        peaks.append((peak - before) / 1024)
    return statistics.median(times), statistics.median(cpu), max(peaks)


def op_part(a) -> dict:
    from megatron.core.tensor_parallel import ColumnParallelLinear, vocab_parallel_cross_entropy
    from megatron.core.transformer import TransformerConfig

    from instella_plugin.model.fused_output_loss import chunk_tokens_for, output_layer_loss
    from instella_plugin.testing.distributed import free_port, init_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    dev, dtype = a.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    if dev == "cuda":
        torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl" if dev == "cuda" else "gloo", rank=0, world_size=1)
    init_parallel(tp=1)
    s, b, h, v = a.seq, a.mbs, a.hidden, a.vocab
    cfg = TransformerConfig(num_layers=1, hidden_size=h, num_attention_heads=8, use_cpu_initialization=True,
                            perform_initialization=False, params_dtype=dtype)
    layer = ColumnParallelLinear(h, v, config=cfg, init_method=torch.nn.init.zeros_, bias=False,
                                 gather_output=False).to(dev)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)
    hidden = torch.randn(s, b, h, device=dev, dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (b, s), device=dev)

    def megatron():
        logits, _ = layer(hidden)
        vocab_parallel_cross_entropy(logits, labels.t().contiguous()).sum().backward()

    def plain():
        logits = torch.nn.functional.linear(hidden, layer.weight)
        torch.nn.functional.cross_entropy(logits.float().reshape(-1, v), labels.t().reshape(-1),
                                          reduction="none").sum().backward()

    variants = {"megatron linear + vocab-parallel CE": megatron, "plain Linear + F.cross_entropy": plain}
    for chunk in a.chunks or [chunk_tokens_for(v, dev)]:
        variants[f"fused, {chunk} tokens a chunk"] = (lambda c: lambda: output_layer_loss(
            layer, hidden, labels, chunk_tokens=c).sum().backward())(chunk)
    out = {}
    logits_mib = s * b * v * 4 / 2**20
    print(f"output layer + loss on {dev}, {s * b} tokens x hidden {h} x vocab {v}, {a.dtype}; "
          f"fp32 logits = {logits_mib:.0f} MiB")
    for name, fn in variants.items():
        fn()  # warm-up
        layer.weight.grad = hidden.grad = None
        t, c, peak = measure(lambda: (fn(), setattr(layer.weight, "grad", None), setattr(hidden, "grad", None)),
                             a.reps, dev)
        out[name] = {"median_s": t, "cpu_s": c, "peak_mib": peak}
        print(f"  {name:<40} {t:7.3f} s (CPU {c:7.3f} s)  peak +{peak:7.0f} MiB", flush=True)
    torch.distributed.destroy_process_group()
    meg, fused = out["megatron linear + vocab-parallel CE"], out[list(out)[-1]]
    saved = meg["peak_mib"] - fused["peak_mib"]
    # fp32: megatron's loss turns the logits into their gradient in place, so the fused path saves one
    # [tokens, V] fp32 buffer less its own chunk; bf16: megatron also holds the bf16 logits/gradient.
    chunk = a.chunks[-1] if a.chunks else chunk_tokens_for(v, dev)
    # (two chunks' worth of slack on CPU, where freed chunks may stay resident in the C allocator's heap)
    need = logits_mib - 2 * min(chunk, s * b) * v * 4 / 2**20 if dtype == torch.float32 else logits_mib
    ok = saved >= need
    print(f"RESULT {'PASS' if ok else 'FAIL'} {dev} {a.dtype} {s * b} tokens, vocab {v}: fused peak "
          f"{fused['peak_mib']:.0f} MiB vs megatron {meg['peak_mib']:.0f} MiB (saves {saved:.0f}, needs {need:.0f}; "
          f"logits {logits_mib:.0f} fp32), time x{meg['median_s'] / fused['median_s']:.2f} of megatron's speed, "
          f"plain loop {out['plain Linear + F.cross_entropy']['median_s']:.3f} s vs fused {fused['median_s']:.3f} s")
    return {"logits_mib": logits_mib, "saved_mib": saved, "variants": out}


def step_part(a) -> dict:
    """One trainer step with and without the fused path: per-phase time and peak memory."""
    from bench_trainer import MegatronVariant, trainer_argv

    from instella_plugin.training.arguments import parse_args
    from instella_plugin.training.forward_step import run_forward_backward
    from instella_plugin.training.setup import initialize_distributed
    from instella_plugin.testing.distributed import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    a.tp_size = 1
    base = trainer_argv(a, "instella")
    device = initialize_distributed(parse_args(base)[0])
    out = {}
    for flag in ("--no-fused-output-loss", "--fused-output-loss"):
        v = MegatronVariant(base + [flag], device)
        t = v.trainer

        def fwd_bwd(t=t, v=v):  # bound now: both names are deleted below, to free the model
            for m in t.model:
                m.zero_grad_buffer()
            run_forward_backward(t.model, t.batches(v.train_ds, 0), seq_length=t.run.model.seq_length,
                                 micro_batch_size=t.run.layout.micro_batch_size,
                                 num_microbatches=t.run.layout.num_microbatches)

        fwd_bwd()  # warm-up (and the optimizer's state)
        t.optimizer.step()
        t_fb, c_fb, peak = measure(fwd_bwd, a.reps)
        t_opt, c_opt, _ = measure(t.optimizer.step, 1)
        out[flag] = {"forward_backward_s": t_fb, "forward_backward_cpu_s": c_fb, "optimizer_s": t_opt,
                     "optimizer_cpu_s": c_opt, "peak_mib": peak}
        print(f"  {flag:<24} forward-backward {t_fb:7.2f} s (CPU {c_fb:7.2f} s)  optimizer {t_opt:5.2f} s "
              f"(CPU {c_opt:5.2f} s)  peak +{peak:7.0f} MiB", flush=True)
        v_ds = v.train_ds
        del v, t, fwd_bwd
    if a.hf:
        out["plain loop"] = _hf_phases(a, v_ds, measure)
    saved = out["--no-fused-output-loss"]["peak_mib"] - out["--fused-output-loss"]["peak_mib"]
    logits_mib = a.seq * a.mbs * a.vocab * 4 / 2**20
    print(f"  peak falls by {saved:.0f} MiB; logits + their gradient = {2 * logits_mib:.0f} MiB")
    torch.distributed.destroy_process_group()
    return {"logits_mib": logits_mib, "saved_mib": saved, "variants": out}


def _hf_phases(a, dataset, measure) -> dict:
    """bench_trainer's plain PyTorch loop, the same phases: forward + loss + backward, then clip + AdamW."""
    from bench_trainer import HFLoopVariant

    from instella_plugin.training.datasets import to_torch_batch

    v = HFLoopVariant(a, dataset, "sdpa")
    batch = to_torch_batch([dataset[i] for i in range(a.mbs)])

    def fwd_bwd():
        v.opt.zero_grad(set_to_none=True)
        logits = v.model(input_ids=batch["tokens"]).logits
        losses = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                   batch["labels"].reshape(-1), reduction="none")
        mask = batch["loss_mask"].reshape(-1)
        ((losses * mask).sum() / mask.sum()).backward()

    def opt():
        torch.nn.utils.clip_grad_norm_(v.model.parameters(), 1.0)
        v.opt.step()

    fwd_bwd()
    opt()
    t_fb, c_fb, peak = measure(fwd_bwd, a.reps)
    t_opt, c_opt, _ = measure(opt, 1)
    print(f"  {'plain loop':<24} forward-backward {t_fb:7.2f} s (CPU {c_fb:7.2f} s)  optimizer {t_opt:5.2f} s "
          f"(CPU {c_opt:5.2f} s)  peak +{peak:7.0f} MiB", flush=True)
    return {"forward_backward_s": t_fb, "forward_backward_cpu_s": c_fb, "optimizer_s": t_opt,
            "optimizer_cpu_s": c_opt, "peak_mib": peak}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["op", "step"], default="op")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunks", type=int, nargs="*", help="fused chunk sizes in tokens (default: the automatic one)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="op part: where it runs")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="op part: hidden and weight dtype")
    add_shape_args(ap)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--no-hf", dest="hf", action="store_false", help="step part: skip the plain PyTorch loop")
    ap.add_argument("--out", default=os.path.join(RESULTS, "output_loss.json"))
    a = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if a.device == "cpu":
        from instella_plugin import cpu_mode

        cpu_mode.enable_if_no_gpu()
    t0 = time.time()
    result = op_part(a) if a.part == "op" else step_part(a)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "part": a.part, "threads": torch.get_num_threads(),
              "load_average": os.getloadavg()[0], "wall_s": time.time() - t0, "reps": a.reps,
              "shape": {k: getattr(a, k) for k in ("layers", "hidden", "heads", "ffn", "seq", "mbs", "vocab")},
              **result}
    history = []
    if os.path.exists(a.out):
        with open(a.out) as f:
            history = json.load(f)
    history.append(record)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".tmp", "w") as f:
        json.dump(history, f, indent=1)
    os.replace(a.out + ".tmp", a.out)
    print(f"results appended to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
