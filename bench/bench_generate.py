"""Generation throughput: the Megatron generator (megatron-core's engine) vs transformers' ``generate``.

Both run the same weights (random, norms 1 + 0.1 N(0,1)) in one process, greedy (or sampling with
``--temperature``, no top-k/top-p), KV cache on, the
same prompts (random ids, lengths spread over [prompt/2, prompt]) and ``--new`` tokens each, at
batch 1 and 16 (``--batches``). Our side is ``MegatronGenerator`` on a megatron GPTModel built
through the ``instella`` spec (TP=1); theirs is our ``InstellaForCausalLM`` (transformers classes,
``attn_implementation="sdpa"``). Each measurement is the best of ``--repeats`` rounds after one warm-up, the two sides taking turns.
On the CPU both sides run with ``--threads`` torch threads (default 1: on a machine shared with other
jobs, two or more threads wait on each other's cores and single ops take up to 1000x longer, which
drowns the comparison; give the core count on a machine of your own); the row records the thread
count and the load average before and after (``os.getloadavg``).
Printed: tokens/s of both and the ratio (ours / transformers); the greedy tokens of both are
compared (in fp32 a difference fails the run; in bf16 the two kernel orders may round apart). The
last line is ``RESULT PASS|FAIL ...`` for the GPU check script. Results are appended to ``--out``
(bench/results/generate.json) and plotted beside it (generate.png).

    python bench/bench_generate.py                                   # CPU: instella-test, fp32
    python bench/bench_generate.py --preset instella-1b --dtype bfloat16 --new 128   # one GPU
"""
import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))

from instella_plugin.megatron_import import import_megatron_core  # noqa: E402

import_megatron_core()

import torch  # noqa: E402

from instella_plugin.hf.configuration_instella import InstellaConfig as HFInstellaConfig  # noqa: E402
from instella_plugin.hf.formats import config_json  # noqa: E402
from instella_plugin.inference.api import SamplingParams  # noqa: E402
from instella_plugin.inference.engine import MegatronGenerator  # noqa: E402
from instella_plugin.inference.loading import init_inference_parallel  # noqa: E402
from instella_plugin.inference.patches import QUIET  # noqa: E402
from instella_plugin.model.build import build_gpt_chunks  # noqa: E402
from instella_plugin.model.config import get_preset  # noqa: E402
from instella_plugin.model.weight_map import load_hf_into_model  # noqa: E402
from instella_plugin.testing.olmoe_reference import random_hf_weights  # noqa: E402


def build(preset: str, dtype, device):
    cfg = get_preset(preset, seq_length=4096)
    hf_weights = random_hf_weights(cfg, seed=1)
    model = build_gpt_chunks(cfg, cfg.transformer_config(params_dtype=dtype), init_seed=None,
                             fused_output_loss=False)[0]
    with torch.no_grad():
        load_hf_into_model(model, hf_weights.__getitem__, cfg)
    model = model.to(device)
    from instella_plugin.hf.modeling_instella import InstellaForCausalLM

    hf_cfg = HFInstellaConfig(**{k: v for k, v in config_json(cfg, "instella", rope_theta=cfg.rotary_base,
                                                              max_positions=cfg.seq_length, dtype=dtype).items()
                                 if k not in ("architectures", "model_type", "transformers_version")})
    hf_cfg._attn_implementation = "sdpa"
    hf = InstellaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(hf_weights, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return cfg, model, hf.to(device=device, dtype=dtype).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_times(fns, repeats, device):
    """Best wall time of each function over ``repeats`` rounds after one warm-up round; each round runs
    them one after the other, so a change in the machine's load falls on both. (times, last outputs)"""
    outs = [fn() for fn in fns]  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            t = time.perf_counter()
            outs[i] = fn()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - t)
    return best, outs


def hf_generate(hf, prompts, new, pad_id=1, temperature=0.0):
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as transformers' generate expects
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    device = next(hf.parameters()).device
    with torch.no_grad():
        sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else \
            dict(do_sample=False)
        out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                          min_new_tokens=new, pad_token_id=pad_id, eos_token_id=None, use_cache=True, **sample)
    return [row[longest:].tolist() for row in out]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="instella-test")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt", type=int, default=64, help="longest prompt (tokens)")
    p.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (tokens compared); > 0: sampling")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1,
                   help="CPU: torch threads for both sides (default 1, see above; 0: torch's default)")
    p.add_argument("--out", default=os.path.join(RESULTS, "generate.json"), help="results JSON (appended)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    device = init_inference_parallel(1, 1, args.device)
    QUIET.apply(["static_engine_progress_bar"])  # one progress bar per timed call would bury the figures
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cfg, model, hf = build(args.preset, dtype, device)
    from instella_plugin.data.tokenizer import load_tokenizer

    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        g = torch.Generator().manual_seed(batch)
        lengths = torch.randint(max(1, args.prompt // 2), args.prompt + 1, (batch,), generator=g).tolist()
        prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
        gen = MegatronGenerator(model, load_tokenizer(), max_batch_size=batch)
        load_before = os.getloadavg()[0]
        params = SamplingParams(max_new_tokens=args.new, temperature=args.temperature, stop_at_eos=False)
        (ours_s, theirs_s), (ours, theirs) = best_times(
            [lambda: gen.generate(prompts, params),
             lambda: hf_generate(hf, prompts, args.new, temperature=args.temperature)], args.repeats, device)
        same = sum(list(c.tokens) == t for c, t in zip(ours, theirs)) if not args.temperature else batch
        tokens = batch * args.new
        row = dict(preset=args.preset, dtype=args.dtype, device=str(device.type), batch=batch, prompt=args.prompt,
                   temperature=args.temperature,
                   new=args.new, megatron_tokens_per_s=tokens / ours_s, transformers_tokens_per_s=tokens / theirs_s,
                   ratio=theirs_s / ours_s, same_greedy=f"{same}/{batch}", threads=torch.get_num_threads(),
                   load_avg_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)], host=platform.node(),
                   time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        rows.append(row)
        print(f"batch {batch:3d}: megatron {row['megatron_tokens_per_s']:9.1f} tok/s   transformers "
              f"{row['transformers_tokens_per_s']:9.1f} tok/s   ratio {row['ratio']:.2f}x   "
              f"same greedy tokens {same}/{batch}   (threads {row['threads']}, load {row['load_avg_1min']})", flush=True)
    if not args.no_save:
        save(rows, args.out)
    # fp32 must give transformers' greedy tokens; in bf16 the two kernel orders may round apart
    mismatch = [r for r in rows if r["same_greedy"].split("/")[0] != r["same_greedy"].split("/")[1]]
    status = "FAIL" if mismatch and args.dtype == "float32" else "PASS"
    print(f"RESULT {status} " + "; ".join(f"batch {r['batch']}: {r['ratio']:.2f}x transformers "
                                         f"({r['megatron_tokens_per_s']:.0f} vs {r['transformers_tokens_per_s']:.0f} "
                                         f"tok/s), greedy {r['same_greedy']}" for r in rows))
    return 1 if status == "FAIL" else 0


def save(rows, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    old = json.load(open(path)) if os.path.isfile(path) else []
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(old + rows, f, indent=1)
    os.replace(tmp, path)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"b{r['batch']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["megatron_tokens_per_s"] for r in rows], 0.4, label="megatron engine")
    ax.bar([i + 0.2 for i in x], [r["transformers_tokens_per_s"] for r in rows], 0.4, label="transformers generate")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("tokens/s")
    mode = "greedy" if not rows[0].get("temperature") else f"sampled (T={rows[0]['temperature']})"
    ax.set_title(f"{mode} generation, {rows[0]['preset']} {rows[0]['dtype']} on {rows[0]['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.splitext(path)[0] + ".png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
