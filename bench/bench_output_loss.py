"""The output layer + loss alone, and one trainer step: time and peak memory, megatron's path vs the fused one.

Part 1 (``--part op``), one process, TP=1: forward + backward of the output layer and the loss at
the trainer benchmark's shape (micro-batch 2 x seq 1024 tokens, hidden 1024, vocabulary 50304,
fp32) for: megatron's ``ColumnParallelLinear`` + ``vocab_parallel_cross_entropy`` (what GPTModel
runs), the plain PyTorch loop's ``Linear`` + ``F.cross_entropy`` (bench_trainer's baseline (b)),
the fused path at several chunk sizes, and last the fused path accumulating its weight gradient into
a ``main_grad`` buffer, as it does under megatron's DDP in the trainer.

Part 2 (``--part step``): one trainer step (bench_trainer's ``MegatronVariant``: the trainer's model,
DDP and optimizer, its forward-backward schedule) with ``--no-fused-output-loss`` and
``--fused-output-loss``, and bench_trainer's plain PyTorch loop, each in a process of its own; per
phase (the transformer's forward, the output layer + loss forward, their backward, the transformer's
backward, the optimizer) wall and CPU time, and peak memory. ``--preset instella-1b`` takes that
model's shape; ``--no-optimizer`` skips the optimizer (no Adam state: a larger model fits in memory).

Peak memory on CPU is the process's resident high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) above the resident size just before the measured call, after the C
allocator has returned its free pages (``malloc_trim``): the memory the call adds; the process's own
peak is recorded too. The step part's workers run with glibc's mmap threshold fixed
(``MALLOC_MMAP_THRESHOLD_``, ``--mmap-threshold``, 128 KiB): every block from that size on is its own
mapping, returned when freed, so the resident size follows the live tensors. With glibc's own, moving
threshold, freed blocks stay in the heap and the same transformer forward measured 1.9-2.7 GiB from
one process to the next; the fixed threshold costs time (fresh pages for every tensor), so compare
phase times within one setting. The per-phase peaks show where a step's peak sits.
On a GPU, the caching allocator's peak above the allocated bytes before the call.
Timings on a shared machine are noisy: medians of ``--reps``. Appends to bench/results/output_loss.json.

    python bench/bench_output_loss.py --part op --reps 3
    python bench/bench_output_loss.py --part step --reps 2                 # the trainer benchmark's shape
    python bench/bench_output_loss.py --part step --preset instella-1b --seq 1024 --mbs 1 --no-optimizer \
        --no-hf --warmup 0 --reps 1
    python bench/bench_output_loss.py --part op --device cuda --dtype bf16 --mbs 4 --seq 4096 --hidden 2560

The op part ends with a ``RESULT PASS|FAIL`` line (for tests/gpu/run_gpu_checks.sh) about its last
variant: PASS when the fused path's peak is below megatron's by at least the fp32 logits in bf16
(megatron holds the bf16 logits or their gradient beside the fp32 ones), by the fp32 logits less two
chunks' in fp32 (megatron's loss turns the fp32 logits into their gradient in place: one buffer).
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


def _release_free_heap() -> None:
    """Give the C allocator's free pages back to the system, so that the resident size counts live memory."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figures then include freed heap kept resident
        pass


class PeakMemory:
    """Peak memory read in pieces (KiB): on CPU the resident high-water mark (``VmHWM``, reset through
    ``/proc/self/clear_refs``), on a GPU the caching allocator's peak of allocated bytes.
    ``checkpoint()`` returns the peak since the previous one and resets the mark, so a phase clock can
    attribute the peak to phases while ``peak()`` still covers the whole call since ``reset()``."""

    def __init__(self):
        self.high, self.device = 0, "cpu"

    def _read(self) -> int:
        return torch.cuda.max_memory_allocated() // 1024 if self.device == "cuda" else _rss_kib("VmHWM")

    def _reset_mark(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := the current resident size

    def reset(self, device: str) -> None:
        self.high, self.device = 0, device
        self._reset_mark()

    def checkpoint(self) -> int:
        now = self._read()
        self.high = max(self.high, now)
        self._reset_mark()
        return now

    def peak(self) -> int:
        return max(self.high, self._read())


PEAK = PeakMemory()


def measure(fn, reps: int, device: str = "cpu", with_process_peak: bool = False):
    """(median wall seconds, median process CPU seconds, peak MiB above the memory in use before the
    call[, the process's peak MiB]) over ``reps`` calls. CPU time is less sensitive than wall time to
    other users' load. On CPU the memory is the resident size (free heap pages released first, then
    ``VmHWM`` reset through ``/proc/self/clear_refs``); on a GPU, the caching allocator's peak of
    allocated bytes."""
    times, cpu, peaks, process = [], [], [], []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated() / 1024
        else:
            _release_free_heap()
            before = _rss_kib("VmRSS")
        PEAK.reset(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        peak = PEAK.peak()
        peaks.append((peak - before) / 1024)
        process.append(peak / 1024)
    out = (statistics.median(times), statistics.median(cpu), max(peaks))
    return out + (max(process),) if with_process_peak else out


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
    for chunk in a.chunks or [chunk_tokens_for(v, dev, dtype=dtype)]:
        variants[f"fused, {chunk} tokens a chunk"] = (lambda c: lambda: output_layer_loss(
            layer, hidden, labels, chunk_tokens=c).sum().backward())(chunk)

    def fused_main_grad(chunk=chunk):
        """As under megatron's DDP (the trainer): the weight gradient accumulated into a main_grad
        buffer that exists before the call (megatron's variant's .grad is what DDP would add there)."""
        w = layer.weight
        if not hasattr(w, "main_grad"):
            w.main_grad = torch.zeros(w.shape, dtype=torch.float32, device=dev)
        w.grad_added_to_main_grad = False
        output_layer_loss(layer, hidden, labels, chunk_tokens=chunk).sum().backward()

    variants[f"fused, {chunk} tokens a chunk, into main_grad"] = fused_main_grad  # last: it marks the weight
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
    chunk = a.chunks[-1] if a.chunks else chunk_tokens_for(v, dev, dtype=dtype)
    # (two chunks' worth of slack on CPU, where freed chunks may stay resident in the C allocator's heap)
    need = logits_mib - 2 * min(chunk, s * b) * v * 4 / 2**20 if dtype == torch.float32 else logits_mib
    ok = saved >= need
    print(f"RESULT {'PASS' if ok else 'FAIL'} {dev} {a.dtype} {s * b} tokens, vocab {v}: fused peak "
          f"{fused['peak_mib']:.0f} MiB vs megatron {meg['peak_mib']:.0f} MiB (saves {saved:.0f}, needs {need:.0f}; "
          f"logits {logits_mib:.0f} fp32), time x{meg['median_s'] / fused['median_s']:.2f} of megatron's speed, "
          f"plain loop {out['plain Linear + F.cross_entropy']['median_s']:.3f} s vs fused {fused['median_s']:.3f} s")
    return {"logits_mib": logits_mib, "saved_mib": saved, "variants": out}


STEP_VARIANTS = ("--no-fused-output-loss", "--fused-output-loss", "plain loop")


def step_part(a) -> dict:
    """One trainer step per variant, each variant in a process of its own (so that no variant reuses
    memory another freed): per-phase times and peak memory."""
    import subprocess
    import tempfile

    variants = [v for v in STEP_VARIANTS if a.hf or v != "plain loop"]
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_output_loss_") as tmp:
        for v in variants:
            path = os.path.join(tmp, "out.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--part", "step", f"--step-variant={v}",
                   "--worker-out", path] + [f"--{k}={getattr(a, k)}" for k in (
                       "layers", "hidden", "heads", "ffn", "seq", "mbs", "vocab", "reps", "warmup")]
            cmd += ["--no-optimizer"] if not a.optimizer else []
            cmd += [f"--device={a.device}"]
            cmd += ["--bf16"] if a.bf16 else []
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if a.mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
            subprocess.run(cmd, check=True, cwd=tmp, env=env)
            with open(path) as f:
                out[v] = json.load(f)
    fused, plain = out["--fused-output-loss"], out["--no-fused-output-loss"]
    saved = plain["peak_mib"] - fused["peak_mib"]
    logits_mib = a.seq * a.mbs * a.vocab * 4 / 2**20
    wgrad_mib = a.vocab * a.hidden * (2 if a.bf16 else 4) / 2**20
    floor = plain["phases"]["transformer forward"]["peak_mib"]
    above = plain["peak_mib"] - floor
    print(f"  peak above the step's start falls by {saved:.0f} MiB (process peak by "
          f"{plain['process_peak_mib'] - fused['process_peak_mib']:.0f} MiB); logits {logits_mib / (2 if a.bf16 else 1):.0f} "
          f"MiB in the model's dtype ({'bf16, and megatron also holds them in fp32' if a.bf16 else 'fp32'}), "
          f"output weight gradient {wgrad_mib:.0f} MiB; megatron's peak is {above:.0f} MiB above its "
          f"transformer forward's ({floor:.0f}): the most any output path could save")
    print("  phases (wall s / CPU s / peak MiB above the step's start):")
    for name, v in out.items():
        print(f"    {name:<24} " + "  ".join(f"{k} {p['wall_s']:6.2f}/{p['cpu_s']:6.2f}/{p['peak_mib']:5.0f}"
                                           for k, p in v["phases"].items()))
    return {"logits_mib": logits_mib, "weight_grad_mib": wgrad_mib, "saved_mib": saved, "bf16": a.bf16,
            "megatron_above_forward_mib": above,
            "variants": out}


class PhaseClock:
    """Wall and CPU time marks of one step: the transformer's forward (embedding and decoder, final
    norm included), the output layer + loss forward, their backward (up to the gradient of the
    decoder's output), the transformer's backward (and the gradient reduction); and each phase's
    peak memory above the memory in use when the step began (where the step's peak sits)."""

    NAMES = ("transformer forward", "output+loss forward", "output+loss backward", "transformer backward")

    def __init__(self, decoder: torch.nn.Module, model: torch.nn.Module, device: str = "cpu"):
        self.marks, self.totals, self.device = [], {}, device

        def decoder_done(module, args, output):
            self.mark()
            hidden = output if torch.is_tensor(output) else output[0]  # (megatron: a tensor; transformers: a ModelOutput)
            if hidden.requires_grad:
                hidden.register_hook(lambda grad: self.mark())

        decoder.register_forward_hook(decoder_done)
        model.register_forward_hook(lambda *unused: self.mark())

    def _in_use_kib(self) -> int:
        return torch.cuda.memory_allocated() // 1024 if self.device == "cuda" else _rss_kib("VmRSS")

    def mark(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), time.process_time(), PEAK.checkpoint()))

    def run(self, fn):
        self.marks = []
        start = self._in_use_kib()
        self.mark()
        fn()
        self.mark()
        if len(self.marks) != 5:
            raise RuntimeError(f"PhaseClock: {len(self.marks)} marks, expected 5 (one micro-batch, one chunk)")
        for name, (w0, c0, _), (w1, c1, peak) in zip(self.NAMES, self.marks, self.marks[1:]):
            t = self.totals.setdefault(name, {"wall_s": [], "cpu_s": [], "peak_mib": []})
            t["wall_s"].append(w1 - w0)
            t["cpu_s"].append(c1 - c0)
            t["peak_mib"].append((peak - start) / 1024)

    def medians(self) -> dict:
        """Median times; the largest peak."""
        return {k: {kk: max(vv) if kk == "peak_mib" else statistics.median(vv) for kk, vv in v.items()}
                for k, v in self.totals.items()}


def step_worker(a) -> None:
    """One variant of the step part, in this process."""
    from bench_trainer import MegatronVariant, trainer_argv

    from instella_plugin.training.arguments import parse_args
    from instella_plugin.training.forward_step import run_forward_backward
    from instella_plugin.training.model_setup import unwrap
    from instella_plugin.training.setup import initialize_distributed
    from instella_plugin.testing.distributed import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    a.tp_size = 1
    base = trainer_argv(a, "instella") + (["--bf16"] if a.bf16 else [])
    base[base.index("--device") + 1] = a.device
    run = parse_args(base)[0]
    device = initialize_distributed(run)
    if a.step_variant == "plain loop":
        from instella_plugin.training.datasets import dataset_sizes
        from instella_plugin.training.plugins import load_plugin

        dataset = load_plugin("instella").build_datasets(run, dataset_sizes(run))[0]
        fwd_bwd, opt, clock = _hf_loop(a, dataset)
    else:
        v = MegatronVariant(base + [a.step_variant], device)
        t = v.trainer
        model = unwrap(t.model[0])
        clock = PhaseClock(model.decoder, model, a.device)

        def fwd_bwd():
            for m in t.model:
                m.zero_grad_buffer()
            run_forward_backward(t.model, t.batches(v.train_ds, 0), seq_length=t.run.model.seq_length,
                                 micro_batch_size=t.run.layout.micro_batch_size,
                                 num_microbatches=t.run.layout.num_microbatches)

        opt = t.optimizer.step
    for _ in range(a.warmup):  # (and the optimizer's state)
        clock.run(fwd_bwd)
        if a.optimizer:
            opt()
    clock.totals = {}
    t_fb, c_fb, peak, process_peak = measure(lambda: clock.run(fwd_bwd), a.reps, a.device, with_process_peak=True)
    t_opt, c_opt, _ = measure(opt, 1, a.device) if a.optimizer else (0.0, 0.0, 0.0)
    res = {"forward_backward_s": t_fb, "forward_backward_cpu_s": c_fb, "optimizer_s": t_opt,
           "optimizer_cpu_s": c_opt, "peak_mib": peak, "process_peak_mib": process_peak, "phases": clock.medians()}
    print(f"  {a.step_variant:<24} forward-backward {t_fb:7.2f} s (CPU {c_fb:7.2f} s)  optimizer {t_opt:5.2f} s "
          f"(CPU {c_opt:5.2f} s)  peak +{peak:7.0f} MiB (process {process_peak:7.0f} MiB)", flush=True)
    with open(a.worker_out, "w") as f:
        json.dump(res, f)
    torch.distributed.destroy_process_group()


def _hf_loop(a, dataset):
    """bench_trainer's plain PyTorch loop, the same phases: forward + loss + backward, then clip + AdamW."""
    from bench_trainer import HFLoopVariant

    from instella_plugin.training.datasets import to_torch_batch

    v = HFLoopVariant(a, dataset, "sdpa")
    v.model.to(device=a.device, dtype=torch.bfloat16 if a.bf16 else torch.float32)
    batch = {k: t.to(a.device) for k, t in to_torch_batch([dataset[i] for i in range(a.mbs)]).items()}
    clock = PhaseClock(v.model.model, torch.nn.Identity(), a.device)

    def fwd_bwd():
        v.opt.zero_grad(set_to_none=True)
        logits = v.model(input_ids=batch["tokens"]).logits
        losses = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                   batch["labels"].reshape(-1), reduction="none")
        mask = batch["loss_mask"].reshape(-1)
        loss = (losses * mask).sum() / mask.sum()
        clock.mark()
        loss.backward()

    def opt():
        torch.nn.utils.clip_grad_norm_(v.model.parameters(), 1.0)
        v.opt.step()

    return fwd_bwd, opt, clock


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["op", "step"], default="op")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunks", type=int, nargs="*", help="fused chunk sizes in tokens (default: the automatic one)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where it runs")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="op part: hidden and weight dtype")
    add_shape_args(ap)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--no-hf", dest="hf", action="store_false", help="step part: skip the plain PyTorch loop")
    ap.add_argument("--preset", help="step part: the model shape of this preset (e.g. instella-1b) instead of "
                                     "--layers/--hidden/--heads/--ffn/--vocab")
    ap.add_argument("--warmup", type=int, default=1, help="step part: untimed steps first")
    ap.add_argument("--no-optimizer", dest="optimizer", action="store_false",
                    help="step part: forward-backward only (no optimizer state: a larger model fits)")
    ap.add_argument("--bf16", action="store_true", help="step part: bf16 weights (the trainer's --bf16)")
    ap.add_argument("--mmap-threshold", type=int, default=128 << 10,
                    help="step part, CPU: glibc's mmap threshold in the workers (bytes; 0: glibc's own, which "
                         "grows as large blocks are freed), see above")
    ap.add_argument("--step-variant", choices=STEP_VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(RESULTS, "output_loss.json"))
    a = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if a.device == "cpu":
        from instella_plugin import cpu_mode

        cpu_mode.enable_if_no_gpu()
    if a.preset:
        from instella_plugin.model.config import get_preset

        cfg = get_preset(a.preset)
        a.layers, a.hidden, a.heads, a.ffn, a.vocab = (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads,
                                                       cfg.ffn_hidden_size, cfg.padded_vocab_size)
    if a.step_variant:
        step_worker(a)
        return 0
    t0 = time.time()
    result = op_part(a) if a.part == "op" else step_part(a)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "part": a.part, "threads": torch.get_num_threads(),
              "load_average": os.getloadavg()[0], "wall_s": time.time() - t0, "reps": a.reps,
              "shape": {k: getattr(a, k) for k in ("layers", "hidden", "heads", "ffn", "seq", "mbs", "vocab")},
              **({"preset": a.preset} if a.preset else {}),
              **({"optimizer": a.optimizer, "mmap_threshold": a.mmap_threshold} if a.part == "step" else {}),
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
