"""``instella convert``: Megatron dist checkpoint <-> Hugging Face directory.

    instella convert --input RUN/checkpoints --output hf/ [--format instella|olmoe] [--dtype bfloat16]
    instella convert --input hf/ --output ckpt/            # HF -> Megatron (weights only, any TP/PP on --load)

The direction follows the input (a directory with config.json is Hugging Face); ``--to`` forces it.
"""
import argparse
import os
import sys
import time

from instella_plugin.flag_types import non_negative_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="megatron save dir / iter_N dir, or an HF model directory")
    p.add_argument("--output", required=True, help="output directory (created atomically)")
    p.add_argument("--to", choices=("hf", "megatron"), help="direction (default: from the input's kind)")
    p.add_argument("--format", default="instella", choices=("instella", "olmoe"),
                   help="HF layout to write: official Instella names, or one-expert OLMoE (stock transformers/vLLM)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="output dtype (default: the input's)")
    p.add_argument("--config", help="model config (preset name or JSON) for a checkpoint that lacks one, or to "
                                    "override the stored one")
    p.add_argument("--tokenizer", help="tokenizer to ship with an HF export (default: the bundled Instella one)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    p.add_argument("--iteration", type=non_negative_int, default=0, help="iteration number of an HF -> Megatron checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory that holds a model")


def parse_size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "B": 1}
    t = text.strip().upper()
    for u in ("KB", "MB", "GB", "TB", "B"):
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * units[u])
            except ValueError:
                break
    if t.isdigit():
        return int(t)
    raise ValueError(f"cannot read size {text!r}; write e.g. 5GB or 500MB")


def run(args) -> int:
    from instella_plugin.hf import convert  # torch.distributed.checkpoint (and sympy): a second; not for --help

    start = time.time()
    if not os.path.exists(args.input):
        print(f"instella convert: input {args.input} does not exist", file=sys.stderr)
        return 2
    to = args.to or ("megatron" if os.path.isfile(os.path.join(args.input, "config.json")) else "hf")
    try:
        dtype = convert.parse_dtype(args.dtype)
        config = convert.load_config_override(args.config)
        if to == "hf":
            convert.megatron_to_hf(args.input, args.output, fmt=args.format, dtype=dtype, overwrite=args.overwrite,
                                   config=config, tokenizer=args.tokenizer,
                                   max_shard_bytes=parse_size(args.max_shard_size))
        else:
            convert.hf_to_megatron(args.input, args.output, dtype=dtype, overwrite=args.overwrite, config=config,
                                   iteration=args.iteration)
    except (ValueError, FileExistsError, FileNotFoundError, KeyError) as e:
        print(f"instella convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({'Hugging Face ' + args.format if to == 'hf' else 'Megatron, weights only'}) "
          f"in {time.time() - start:.1f}s")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="instella convert", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
