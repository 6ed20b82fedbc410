"""``instella data synth long-qa``: long-context QA chats from long documents and a generator.

    python -m instella_plugin.synth.long_qa_cli DOCS.jsonl --output long_qa.jsonl \\
        (--endpoint http://localhost:8000/v1 --model NAME | --load CKPT) [--kind qa|summary] \\
        [--span-tokens 2048 8192] [--spans-per-document 1] [--min-document-tokens 4096]

Documents are JSONL/Parquet/Arrow records (``--text-key``, default ``text``), files, directories or
globs. The generator is an OpenAI-compatible endpoint (vLLM, SGLang...) or a Megatron checkpoint run in
this process by megatron-core's inference engine; failed endpoint calls are retried with backoff.
Writes OUTPUT (JSONL of ``{"messages": [...], "source": {...}}``, atomically) and
OUTPUT.summary.json; `instella data sft OUTPUT --output-prefix ...` makes the SFT store ``long-sft``
packs. See ``synth/long_qa.py`` for the stages.
"""
from __future__ import annotations

import argparse
import os
import sys

from instella_plugin.data.readers import BadRecord, read_documents, resolve_inputs
from instella_plugin.flag_types import positive_int
from instella_plugin.inference.loading import checkpoint_plan, init_inference_parallel, load_generator
from instella_plugin.synth.endpoint import GeneratorUnavailable, OpenAIEndpoint, Retrying, check_one_process
from instella_plugin.synth.long_qa import KINDS, LongQAConfig, write_long_qa


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instella data synth long-qa", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="long documents: JSONL/Parquet/Arrow files, directories or globs")
    p.add_argument("--output", required=True, help="JSONL of chats (OUTPUT.summary.json gets the counts)")
    p.add_argument("--text-key", default="text", help="the documents' text field")
    gen = p.add_mutually_exclusive_group(required=True)
    gen.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    gen.add_argument("--load", help="a Megatron checkpoint to generate with (one process)")
    p.add_argument("--model", default="default", help="model name sent to the endpoint")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the endpoint's API key")
    p.add_argument("--chat", action="store_true", help="send prompts as chat messages")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per endpoint request")
    p.add_argument("--retries", type=int, default=4)
    p.add_argument("--backoff", type=float, default=2.0)
    p.add_argument("--kind", default="qa", choices=KINDS, help="qa: the generator writes question and answer; "
                   "summary: a fixed question about the span, the generator's summary is the answer")
    p.add_argument("--span-tokens", type=positive_int, nargs=2, default=(2048, 8192), metavar=("MIN", "MAX"))
    p.add_argument("--spans-per-document", type=positive_int, default=1)
    p.add_argument("--min-document-tokens", type=positive_int, default=4096)
    p.add_argument("--max-new-tokens", type=positive_int, default=512)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--overwrite", action="store_true")
    return p


def _documents(files, key):
    for text, where, _ in read_documents(files, key):
        if isinstance(text, BadRecord):
            raise ValueError(f"{where}: {text}")
        yield text


def _generator(args):
    if args.endpoint:
        gen = OpenAIEndpoint.from_flags(args.endpoint, args.model, api_key_env=args.api_key_env, chat=args.chat,
                                        timeout_s=args.timeout)
    else:
        check_one_process("long-qa")
        plan = checkpoint_plan(args.load)
        if args.span_tokens[1] + args.max_new_tokens + 128 > plan.seq_length:
            raise ValueError(f"spans of up to {args.span_tokens[1]} tokens plus --max-new-tokens "
                             f"{args.max_new_tokens} do not fit the checkpoint's context ({plan.seq_length}); "
                             "lower --span-tokens MAX")
        init_inference_parallel(1, 1)
        gen = load_generator(plan, chat=args.chat)
    return Retrying(gen, retries=args.retries, backoff_s=args.backoff, log=lambda m: print(m, file=sys.stderr))


def main(argv=None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = LongQAConfig(kind=args.kind, span_tokens=tuple(args.span_tokens),
                              spans_per_document=args.spans_per_document,
                              min_document_tokens=args.min_document_tokens, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, seed=args.seed)
        files = resolve_inputs(args.inputs)
        if os.path.exists(args.output) and not args.overwrite:
            raise FileExistsError(f"output {args.output} already exists; pass --overwrite to replace it")
        counts = write_long_qa(_documents(files, args.text_key), _generator(args), args.output, config,
                               overwrite=args.overwrite, inputs=files)
    except GeneratorUnavailable as exc:
        print(f"instella data synth long-qa: error: {exc}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"instella data synth long-qa: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.output}: {counts['chats']:,} chats from {counts['documents']:,} documents "
          f"({counts['skipped_short']:,} too short, {counts['unparsable']:,} replies unparsable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
