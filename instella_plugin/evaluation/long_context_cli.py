"""``instella eval niah``: needle-in-a-haystack retrieval of a Megatron checkpoint over lengths x depths.

    instella eval niah --load CKPT --lengths 4K,8K,16K --depths 0,0.25,0.5,0.75,1 --output-dir OUT
                       [--variant multikey --distractors 3] [--samples 4] [--haystack essay.txt]
    torchrun --nproc-per-node 2 -m instella_plugin.evaluation.long_context_cli --load CKPT \\
                       --tensor-model-parallel-size 2 ...

Writes OUT/niah_VARIANT.json (per-cell accuracy, per-length and overall means, every reply with
``--log-samples``) and OUT/niah_VARIANT.png (depth x length heatmap); prints the table. Settings
are checked, and every prompt built against the checkpoint's context, before the model loads.
"""
import argparse
import os
import sys

import torch

from instella_plugin.evaluation.long_context import (
    NeedleConfig,
    build_examples,
    evaluate_needles,
    plot_heatmap,
    table,
    write_results,
)
from instella_plugin.inference.loading import checkpoint_plan, init_inference_parallel, load_generator
from instella_plugin.rope.apply import apply_rope_method, checkpoint_rope


def _length(text: str) -> int:
    t = text.strip().upper()
    try:
        return int(t[:-1]) * 1024 if t.endswith("K") else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a context length: {text!r} (use 8192 or 8K)") from None


def _list(kind):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise argparse.ArgumentTypeError(f"bad list {text!r}: {e}") from None
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instella eval niah", description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="Megatron checkpoint directory (any TP/PP layout)")
    p.add_argument("--lengths", type=_list(_length), default=NeedleConfig.lengths, help="comma list, e.g. 4K,8K")
    p.add_argument("--depths", type=_list(float), default=NeedleConfig.depths, help="comma list in [0, 1]")
    p.add_argument("--samples", type=int, default=NeedleConfig.samples, help="prompts per (length, depth)")
    p.add_argument("--variant", default="single", choices=["single", "multikey"])
    p.add_argument("--distractors", type=int, default=NeedleConfig.distractors, help="multikey: other needles")
    p.add_argument("--haystack", default=None, help="a text file as filler (default: RULER's noise sentences)")
    p.add_argument("--seed", type=int, default=NeedleConfig.seed)
    p.add_argument("--max-new-tokens", type=int, default=NeedleConfig.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--log-samples", action="store_true", help="keep every prompt's reply in the JSON")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = NeedleConfig(lengths=args.lengths, depths=args.depths, samples=args.samples, variant=args.variant,
                           distractors=args.distractors, max_new_tokens=args.max_new_tokens, seed=args.seed)
        haystack = open(args.haystack, encoding="utf-8").read() if args.haystack else None
        plan = checkpoint_plan(args.load, args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    except (ValueError, OSError) as e:
        raise SystemExit(f"instella eval niah: error: {e}")
    init_inference_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.device)
    generator = load_generator(plan)
    theta, scaling = checkpoint_rope(args.load)
    if scaling.scales:  # the checkpoint was extended with linear / ntk / yarn RoPE: run it that way
        apply_rope_method([generator.model], scaling, theta or plan.model.rotary_base)
        print(f"RoPE {scaling.describe()} at theta {theta or plan.model.rotary_base:,.0f} (from the checkpoint)")
    try:  # every prompt must fit the checkpoint's context with the answer
        longest = max(e.prompt_tokens for e in build_examples(cfg, generator.tokenizer, haystack))
    except ValueError as e:
        raise SystemExit(f"instella eval niah: error: {e}")
    if longest + cfg.max_new_tokens > generator.max_sequence_length:
        raise SystemExit(f"instella eval niah: error: the longest prompt ({longest} tokens) plus "
                         f"--max-new-tokens {cfg.max_new_tokens} exceeds the model's context "
                         f"({generator.max_sequence_length}); drop the longer --lengths")
    leader = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    record = evaluate_needles(generator, cfg, haystack, args.batch_size, log=print if leader else None)
    record["model"] = {"load": os.path.abspath(args.load), "tp": args.tensor_model_parallel_size,
                       "pp": args.pipeline_model_parallel_size}
    if not args.log_samples:
        record.pop("samples")
    if leader:
        print(table(record))
        base = os.path.join(args.output_dir, record["task"])
        print(f"wrote {write_results(base + '.json', record)} and {plot_heatmap(record, base + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
