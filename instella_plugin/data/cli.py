"""Tokenise to Megatron .bin/.idx, index token files, resolve blends, format SFT chats.

``instella data prepare | index | blend | sft | convert`` (and ``synth``, routed by ``instella``): each subcommand calls the library function of the same job (``prepare.prepare``, ``index_tokens.index_token_files``, ``blends.resolve_blend``,
``sft.write_sft``/``write_preference``, ``convert.convert``) and prints what it wrote."""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from instella_plugin.flag_types import non_negative_int, positive_int


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instella data", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    a = sub.add_parser("prepare", help="tokenise JSONL/Parquet/Arrow/HF-cache data to .bin/.idx")
    a.add_argument("inputs", nargs="+", help="files, directories, globs, or a dataset name in the local HF cache")
    a.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    a.add_argument("--tokenizer", default=None, help="tokenizer .json, directory or cached name (default: Instella)")
    a.add_argument("--json-key", default="text", help="text field (JSONL) or column (Parquet/Arrow)")
    a.add_argument("--workers", type=positive_int, default=1)
    a.add_argument("--dtype", default="auto", choices=["auto", "uint16", "int32"])
    a.add_argument("--no-append-eod", action="store_true", help="do not end each document with EOS")
    a.add_argument("--split-sentences", action="store_true", help="one sequence per sentence (NLTK Punkt, offline)")
    a.add_argument("--language", default="english", help="Punkt model for --split-sentences")
    a.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed records instead of failing")
    a.add_argument("--no-progress", action="store_true")
    a.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx")
    a.add_argument("--input-format", default="text", choices=["text", "mds"],
                   help="mds: MosaicML streaming shards of token ids (documents, loss masks) to the SFT store "
                        "PREFIX_tokens / PREFIX_mask, one example per document (data.mds)")
    a.add_argument("--mds-tokens-column", default="input_ids", help="MDS column of token ids (input_ids)")
    a.add_argument("--mds-indices-column", default="indices", help="MDS column of document (start, end) spans")
    a.add_argument("--mds-mask-column", default="mask", help="MDS column of the loss mask")

    i = sub.add_parser("index", help="build .idx files for raw uint16 token files (OLMo/Dolma .npy)")
    i.add_argument("files", nargs="+")
    i.add_argument("--output-dir", default=None, help="where PREFIX.{bin,idx} go (default: beside each file)")
    i.add_argument("--eod-id", type=non_negative_int, default=0, help="document separator (0 for Instella; 50279 in older AI2 files)")
    i.add_argument("--dtype", default="uint16", choices=["uint16", "int32"])
    i.add_argument("--bin-mode", default="symlink", choices=["symlink", "hardlink", "copy"])
    i.add_argument("--overwrite", action="store_true", help="replace existing PREFIX.bin/.idx")

    b = sub.add_parser("blend", help="resolve a blend against a data root; print the table, write per-split JSON")
    b.add_argument("blend", help="built-in blend name or a YAML path")
    b.add_argument("--data-root", required=True)
    b.add_argument("--output", default=None, help="write the --per-split-data-args-path JSON here")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --output file")

    s = sub.add_parser("sft", help="format chats (or preference pairs) to token and loss-mask arrays")
    s.add_argument("inputs", nargs="+", help='JSONL with {"messages": [...]} (or "chosen"/"rejected")')
    s.add_argument("--output-prefix", required=True, help="writes PREFIX_tokens and PREFIX_mask")
    s.add_argument("--preference", action="store_true", help="inputs hold chosen/rejected pairs")
    s.add_argument("--tokenizer", default=None)
    s.add_argument("--overwrite", action="store_true", help="replace existing PREFIX_tokens/PREFIX_mask")

    c = sub.add_parser("convert", help="a post-training source (SmolTalk, Tulu-3, ...) to chat/pair/prompt JSONL")
    c.add_argument("source", nargs="?", help="a source of data/sources.yaml (--list shows them)")
    c.add_argument("--output", help="the JSONL to write (OUTPUT.counts.json gets the count report)")
    c.add_argument("--input", nargs="+", default=(), help="local files in the data set's field layout "
                   "(default: the data set in the local Hugging Face cache)")
    c.add_argument("--as-text", action="store_true", help="chats flattened to text documents (stage 2)")
    c.add_argument("--seed", type=non_negative_int, default=96, help="seed of per-row random choices (MMLU rewrite)")
    c.add_argument("--limit", type=positive_int, default=None, help="read at most this many rows")
    c.add_argument("--config", default=None, help="the data set's config (default: the registry's)")
    c.add_argument("--split", default=None, help="the data set's split (default: the registry's)")
    c.add_argument("--list", action="store_true", help="list the known sources and exit")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    sub.add_parser("synth", help="synthetic data (gsm8k): `instella data synth gsm8k --help`")
    return p


def main(argv=None) -> int:
    # megatron-core warns on import when Transformer Engine/Apex are absent; none of it is used here
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as exc:
        print(f"instella data {args.action}: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    # The CLI edge: each action's module imports megatron-core's dataset code (seconds), so it is
    # imported here, for the action that runs, and `instella data --help` stays instant.
    if args.action == "prepare" and args.input_format == "mds":
        from instella_plugin.data.mds import MDSColumns, prepare_mds

        stats = prepare_mds(args.inputs, args.output_prefix, MDSColumns(
            args.mds_tokens_column, args.mds_indices_column, args.mds_mask_column), dtype=args.dtype,
            overwrite=args.overwrite)
        print(f"{args.output_prefix}: {stats['samples']:,} MDS samples, {stats['documents']:,} documents, "
              f"{stats['tokens']:,} tokens ({stats['loss_tokens']:,} with loss)")
    elif args.action == "prepare":
        from instella_plugin.data.prepare import prepare, stats_line

        stats = prepare(args.inputs, args.output_prefix, args.tokenizer, json_key=args.json_key,
                        workers=args.workers, dtype=args.dtype, append_eod=not args.no_append_eod,
                        split_sentences=args.split_sentences, language=args.language,
                        skip_bad_records=args.skip_bad_lines, progress=False if args.no_progress else None,
                        overwrite=args.overwrite)
        print(stats_line(stats))
    elif args.action == "index":
        from instella_plugin.data.index_tokens import index_token_files

        for r in index_token_files(args.files, args.output_dir, eod_id=args.eod_id, dtype=args.dtype,
                                   bin_mode=args.bin_mode, overwrite=args.overwrite):
            print(f"{r['prefix']}: {r['documents']:,} documents, {r['tokens']:,} tokens")
    elif args.action == "blend":
        from instella_plugin.data.blends import resolve_blend

        resolved = resolve_blend(args.blend, args.data_root)
        print(resolved.table())
        if args.output:
            print(f"wrote {resolved.write_per_split_json(args.output, args.overwrite)}")
        else:
            print(json.dumps(resolved.per_split()))
    elif args.action == "sft":
        from instella_plugin.data.sft import read_chat_jsonl, write_preference, write_sft

        chats = (c for path in args.inputs for c in read_chat_jsonl(path, args.preference))
        n = (write_preference if args.preference else write_sft)(chats, args.output_prefix, args.tokenizer,
                                                                 overwrite=args.overwrite, inputs=args.inputs)
        print(f"{args.output_prefix}: {n:,} {'pairs' if args.preference else 'chats'}")
    elif args.action == "convert":
        from instella_plugin.data.convert import convert
        from instella_plugin.data.sources import get_source, known_sources

        if args.list or not args.source:
            for name in known_sources():
                print(f"{name:30s} {get_source(name).hf}")
            return 0 if args.list else 2
        if not args.output:
            raise ValueError("--output is required: the JSONL file to write")
        counts = convert(args.source, args.output, args.input, as_text=args.as_text, seed=args.seed, limit=args.limit,
                         config=args.config, split=args.split, overwrite=args.overwrite)
        print(counts.report())
        print(f"wrote {args.output} and {args.output}.counts.json")
    elif args.action == "synth":
        raise ValueError("run it as `instella data synth ...` (the synthesis tools live above the data layer)")
    return 0
