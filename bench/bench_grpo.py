"""One GRPO step's rollouts against transformers' ``generate``, and where a GRPO step spends its time.

The GRPO loop (``rl.loop.grpo``, one rank, TP=1) runs two steps of ``--prompts`` arithmetic prompts x
``--n`` rollouts of up to ``--new`` tokens at temperature 1 on a randomly initialised model
(``--preset``); the second step's record gives the rollout tokens/s of the live-policy generator
(``--engine``: megatron-core's engine, or the plain sampler) and the split of the step into rollout,
scoring (policy and reference log-probs) and update. The baseline, measured in the same process:
transformers' ``generate`` (our ``InstellaForCausalLM``, sdpa, KV cache, sampling at temperature 1,
no top-k) on the HF export of the policy's starting weights, the same prompts repeated n times, in
one batch. Printed: both tokens/s, the ratio (ours / transformers) and the rollout share of the
step; appended to bench/results/grpo.json and plotted to bench/results/grpo.png.

On the CPU the whole run (the GRPO loop and transformers) holds ``--threads`` torch threads (default
1; the trainer's set-up would take every core, and on a machine shared with other jobs two threads
wait on each other's cores so that single ops take up to 1000x longer); the row records the thread
count and the load average before and after.

    python bench/bench_grpo.py                                   # CPU: instella-tiny, fp32
    python bench/bench_grpo.py --preset instella-1b --new 512 --prompts 16 --n 8      # one GPU
"""
import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))

from instella_plugin.megatron_import import import_megatron_core  # noqa: E402

import_megatron_core()

import torch  # noqa: E402

from instella_plugin.data.tokenizer import load_tokenizer  # noqa: E402
from instella_plugin.hf.configuration_instella import InstellaConfig as HFInstellaConfig  # noqa: E402
from instella_plugin.hf.formats import config_json  # noqa: E402
from instella_plugin.hf.modeling_instella import InstellaForCausalLM  # noqa: E402
from instella_plugin.model.build import build_gpt_chunks  # noqa: E402
from instella_plugin.rl.loop import grpo  # noqa: E402
from instella_plugin.testing.olmoe_reference import gather_hf  # noqa: E402
from instella_plugin.training.arguments import parse_args  # noqa: E402


def hf_export_of_start(run):
    """transformers' model holding the policy's starting weights (the trainer's init, same seed)."""
    chunks = build_gpt_chunks(run.model, run.model.transformer_config(cpu=True), init_seed=run.flags.seed)
    weights = gather_hf(chunks, run.model, None)
    cfg = run.model
    hf_cfg = HFInstellaConfig(**{k: v for k, v in config_json(cfg, "instella", rope_theta=cfg.rotary_base,
                                                              max_positions=cfg.seq_length, dtype=torch.float32).items()
                                 if k not in ("architectures", "model_type", "transformers_version")})
    hf_cfg._attn_implementation = "sdpa"
    hf = InstellaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return hf.eval()


def hf_sample(hf, prompts, new, device, pad_id=1, eos_id=0):
    """Sampled continuations (temperature 1, no top-k/top-p) in one left-padded batch; (tokens, seconds)."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                          do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad_id,
                          eos_token_id=eos_id, use_cache=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = 0
    for row in out[:, longest:].tolist():
        tokens += row.index(eos_id) + 1 if eos_id in row else len(row)
    return tokens, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="instella-tiny")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8, help="rollouts per prompt")
    p.add_argument("--new", type=int, default=64, help="response tokens at most")
    p.add_argument("--engine", default="megatron", choices=("megatron", "plain"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1,
                   help="CPU: torch threads for the whole run (default 1, see above; 0: the trainer's choice)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533").items():
        os.environ.setdefault(k, v)
    work = tempfile.mkdtemp(prefix="bench_grpo_")
    prompts_path = os.path.join(work, "prompts.jsonl")
    g = torch.Generator().manual_seed(0)
    with open(prompts_path, "w", encoding="utf-8") as f:
        for _ in range(args.prompts):
            a, b = (int(x) for x in torch.randint(0, 1000, (2,), generator=g))
            f.write(json.dumps({"prompt": f"Compute {a} + {b}. Put the answer in \\boxed{{}}.", "answer": a + b}) + "\n")
    run, plugin = parse_args([
        "--plugin", "instella", "--model-preset", args.preset, "--seq-length", str(64 + args.new), "--device",
        args.device, "--dataset-type", "grpo", "--data-path", prompts_path, "--grpo-group-size", str(args.n),
        "--grpo-prompts-per-step", str(args.prompts), "--global-batch-size", str(args.prompts * args.n),
        "--grpo-max-prompt-tokens", "64", "--grpo-max-response-tokens", str(args.new),
        "--grpo-rollout-engine", args.engine, "--grpo-rollout-batch", str(args.prompts * args.n),
        "--lr", "1e-6", "--lr-decay-style", "constant", "--train-iters", "2", "--no-plot", "--seed", "1234"])
    on_cpu = args.device == "cpu" or not torch.cuda.is_available()
    with held_threads(args.threads if on_cpu else 0):
        records = grpo(run, plugin, plugin.grpo_settings(run))["records"]
    step = records[2]  # the first step pays for warm-up
    device = torch.device("cuda") if torch.cuda.is_available() and args.device != "cpu" else torch.device("cpu")
    hf = hf_export_of_start(run).to(device)
    tok = load_tokenizer()
    formatted = [ids for ids in _prompt_ids(prompts_path, tok, run, plugin) for _ in range(args.n)]
    hf_sample(hf, formatted[:2], 4, device)  # warm-up
    tokens, seconds = hf_sample(hf, formatted, args.new, device)
    step_s = step["rollout_s"] + step["score_s"] + step["update_s"]
    row = dict(preset=args.preset, engine=args.engine, device=device.type, prompts=args.prompts, n=args.n,
               new=args.new, grpo_rollout_tokens_per_s=step["rollout_tokens_per_s"],
               transformers_tokens_per_s=tokens / seconds,
               ratio=step["rollout_tokens_per_s"] / (tokens / seconds), rollout_share=step["rollout_s"] / step_s,
               score_share=step["score_s"] / step_s, update_share=step["update_s"] / step_s,
               threads=torch.get_num_threads(), load_avg_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)],
               host=platform.node(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    print(f"GRPO step rollouts ({args.engine}): {row['grpo_rollout_tokens_per_s']:,.1f} tok/s   transformers generate: "
          f"{row['transformers_tokens_per_s']:,.1f} tok/s   ratio {row['ratio']:.2f}x   step time: rollout "
          f"{100 * row['rollout_share']:.0f}%, scoring {100 * row['score_share']:.0f}%, update "
          f"{100 * row['update_share']:.0f}%   (threads {row['threads']}, load {row['load_avg_1min']})", flush=True)
    if not args.no_save:
        save(row)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


@contextlib.contextmanager
def held_threads(n: int):
    """Hold torch at ``n`` threads (0: change nothing) while the block runs, whatever it sets."""
    if n <= 0:
        yield
        return
    real = torch.set_num_threads
    real(n)
    torch.set_num_threads = lambda _: None
    try:
        yield
    finally:
        torch.set_num_threads = real


def _prompt_ids(path, tok, run, plugin):
    from instella_plugin.rl.prompts import load_problems

    s = plugin.grpo_settings(run)
    problems, _ = load_problems(path, tok, s.prompt_key, s.answer_key, s.max_prompt_tokens, s.chat_template)
    return [list(q.prompt_ids) for q in problems]


def save(row):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "grpo.json")
    old = json.load(open(path)) if os.path.isfile(path) else []
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(old + [row], f, indent=1)
    os.replace(tmp, path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.bar(["GRPO rollouts", "transformers generate"],
            [row["grpo_rollout_tokens_per_s"], row["transformers_tokens_per_s"]])
    ax1.set_ylabel("tokens/s")
    ax1.set_title(f"{row['preset']} on {row['device']}, {row['prompts']}x{row['n']} rollouts")
    ax2.bar(["rollout", "scoring", "update"], [row["rollout_share"], row["score_share"], row["update_share"]])
    ax2.set_ylabel("share of the GRPO step")
    fig.tight_layout()
    tmp = os.path.join(RESULTS, "grpo.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, os.path.join(RESULTS, "grpo.png"))


if __name__ == "__main__":
    sys.exit(main())
