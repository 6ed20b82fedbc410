"""``instella merge``: weight ensembling of N checkpoints (Megatron or Hugging Face).

    instella merge --inputs seed_5796/checkpoints seed_6198/checkpoints seed_8915/checkpoints --output merged
    instella merge --inputs a/ b/ --weights 0.7 0.3 --output ab/ --dtype bfloat16

Uniform mean by default; ``--weights`` are relative (divided by their sum). Accumulation is fp32.
"""
import argparse
import sys
import time

from instella_plugin.hf.convert_cli import parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", nargs="+", required=True, help="checkpoints to average (all Megatron or all HF)")
    p.add_argument("--output", required=True, help="output directory (created atomically)")
    p.add_argument("--weights", nargs="+", type=float, help="one non-negative weight per input (default: uniform)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="output dtype (default: the first input's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard of an HF output")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory that holds a model")


def run(args) -> int:
    from instella_plugin.hf.convert import parse_dtype  # torch.distributed.checkpoint: a second; not for --help
    from instella_plugin.hf.merge import merge

    start = time.time()
    try:
        kwargs = {}
        if args.max_shard_size != "5GB":
            kwargs["max_shard_bytes"] = parse_size(args.max_shard_size)
        merge(args.inputs, args.output, args.weights, parse_dtype(args.dtype), args.overwrite, **kwargs)
    except (ValueError, FileExistsError, FileNotFoundError, KeyError) as e:
        print(f"instella merge: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(args.inputs)} checkpoints into {args.output} in {time.time() - start:.1f}s")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="instella merge", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
