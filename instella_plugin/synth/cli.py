"""``instella data synth gsm8k``: the GSM8K-synthetic set from seed problems and a generator
(``instella data synth long-qa``: see ``synth/long_qa_cli.py``).

The generator is an OpenAI-compatible endpoint (``--endpoint URL --model NAME``) or a Megatron
checkpoint (``--load CKPT``, megatron-core's inference engine in this process). Seeds are GSM8K train
rows (``--seeds`` files in the public layout, or ``openai/gsm8k`` in the local Hugging Face cache);
the held-out set for decontamination is GSM8K test (``--test-set`` files, or the cache). See
``synth/gsm8k.py`` for the stages and docs/data.md for a walk-through.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from tqdm import tqdm

from instella_plugin.data.convert import RowConverter
from instella_plugin.data.sources import SourceError, field_value, get_source, iter_rows, source_files
from instella_plugin.flag_types import positive_int
from instella_plugin.data.tokenizer import load_tokenizer
from instella_plugin.inference.loading import checkpoint_plan, check_tokenizer, init_inference_parallel, load_generator
from instella_plugin.inference.prompts import check_fits, prompt_ids
from instella_plugin.synth.decontaminate import NgramIndex
from instella_plugin.synth.endpoint import GeneratorUnavailable, OpenAIEndpoint, Retrying, check_one_process
from instella_plugin.synth.gsm8k import SynthConfig, load_prompts, synthesise
from instella_plugin.synth.held_out import task_texts
from instella_plugin.synth.sandbox import SandboxLimits
from instella_plugin.synth import long_qa_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instella data synth", description="synthetic training data from a generator: "
                                "gsm8k (programs re-instantiated), long-qa (questions over long documents)")
    sub = p.add_subparsers(dest="task", metavar="TASK", required=True)
    sub.add_parser("long-qa", add_help=False, help="questions about spans of long documents, asked over the whole "
                   "document (its own options: `instella data synth long-qa --help`)")
    g = sub.add_parser("gsm8k", help="programs from GSM8K problems, re-instantiated, answers checked")
    g.add_argument("--output", required=True, help="JSONL to write (OUTPUT.summary.json gets the counts)")
    g.add_argument("--seeds", nargs="+", default=(), help="GSM8K-layout files (question, answer); default: the cache")
    g.add_argument("--test-set", nargs="+", default=(), help="held-out files to decontaminate against; default: "
                   "GSM8K test from the cache")
    g.add_argument("--test-field", default="question", help="text field of the --test-set rows")
    g.add_argument("--decontaminate-tasks", default=None, help="also the test splits of these evaluation tasks "
                   "(comma-separated, e.g. gsm8k,mmlu), read as `instella eval` reads them")
    g.add_argument("--eval-data-dir", default=None, help="the task data directory of `instella eval`")
    gen = g.add_mutually_exclusive_group(required=True)
    gen.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    gen.add_argument("--load", help="a Megatron checkpoint to generate with (one process)")
    g.add_argument("--model", default="default", help="model name sent to the endpoint")
    g.add_argument("--api-key-env", default=None, help="environment variable holding the endpoint's API key")
    g.add_argument("--chat", action="store_true", help="send prompts as chat messages (chat template / chat API)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per endpoint request")
    g.add_argument("--retries", type=int, default=4, help="retries of a failed generator call (backoff doubles)")
    g.add_argument("--backoff", type=float, default=2.0, help="seconds before the first retry")
    g.add_argument("--per-seed", type=positive_int, default=4, help="new problems per seed at most")
    g.add_argument("--attempts", type=positive_int, default=24, help="parameter draws per seed")
    g.add_argument("--batch-size", type=positive_int, default=16, help="seeds per generator batch (and per save)")
    g.add_argument("--ngram", type=positive_int, default=13, help="decontamination n-gram size (words)")
    g.add_argument("--program-tokens", type=positive_int, default=768, help="new tokens for a program")
    g.add_argument("--solution-tokens", type=positive_int, default=384, help="new tokens for a solution")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--limit", type=positive_int, default=None, help="use the first N seeds")
    g.add_argument("--call-timeout", type=float, default=2.0, help="seconds a program call may run")
    g.add_argument("--memory-mb", type=positive_int, default=512, help="address space of a program's process")
    g.add_argument("--workers", type=positive_int, default=2, help="programs run side by side (one process each)")
    g.add_argument("--overwrite", action="store_true", help="replace OUTPUT (and any partial run of it)")
    g.add_argument("--no-progress", action="store_true")
    return p


def _seeds(args) -> list:
    src = get_source("gsm8k")
    files = source_files(src, args.seeds)
    convert_row = RowConverter(src)
    out = []
    for index, (row, where) in enumerate(iter_rows(files, args.limit)):
        rec = convert_row(row, where, index)
        out.append({"id": str(index), "prompt": rec["prompt"], "answer": rec["answer"]})
    if not out:
        raise SourceError(f"no seed problems in {', '.join(files)}")
    return out


def _test_index(args) -> NgramIndex:
    """GSM8K test (--test-set files, or the cache when no evaluation task is named) plus the tasks'."""
    tasks = [t for t in (args.decontaminate_tasks or "").split(",") if t.strip()]
    texts = task_texts([t.strip() for t in tasks], args.eval_data_dir) if tasks else []
    if args.test_set or not tasks:
        files = source_files(get_source("gsm8k"), args.test_set, split="test")
        held = [field_value(row, args.test_field, where) for row, where in iter_rows(files)]
        if not held:
            raise SourceError(f"the held-out set {', '.join(files)} is empty: decontamination needs it")
        texts += held
    return NgramIndex(texts, args.ngram)


def _generator(args, seeds):
    if args.endpoint:
        gen = OpenAIEndpoint.from_flags(args.endpoint, args.model, api_key_env=args.api_key_env, chat=args.chat,
                                        timeout_s=args.timeout)
    else:
        check_one_process("synthesis")
        plan = checkpoint_plan(args.load)
        tok = load_tokenizer(plan.tokenizer)
        check_tokenizer(plan, tok)
        # the longest program prompt must fit the model's context with its new tokens: checked before loading
        longest = max(seeds, key=lambda s: len(s["prompt"]))["prompt"].strip()
        check_fits([prompt_ids(tok, load_prompts()["abstract"].replace("{question}", longest), args.chat)],
                   args.program_tokens, plan.seq_length)
        init_inference_parallel(1, 1)
        gen = load_generator(plan, tokenizer=tok, chat=args.chat)
        gen.describe = lambda: f"megatron checkpoint {args.load}"
    return Retrying(gen, retries=args.retries, backoff_s=args.backoff, log=lambda m: print(m, file=sys.stderr))


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["long-qa"]:
        return long_qa_cli.main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if os.path.exists(args.output) and not args.overwrite:
            raise FileExistsError(f"output {args.output} already exists; pass --overwrite to replace it")
        seeds, index = _seeds(args), _test_index(args)
        generator = _generator(args, seeds)
        config = SynthConfig(per_seed=args.per_seed, attempts=args.attempts, seed=args.seed, batch_size=args.batch_size,
                             ngram=args.ngram, abstract_tokens=args.program_tokens, solve_tokens=args.solution_tokens)
        limits = SandboxLimits(call_timeout_s=args.call_timeout, memory_mb=args.memory_mb)
        with tqdm(total=len(seeds), unit="seed", disable=args.no_progress, file=sys.stderr) as bar:
            def progress(n, summary):
                bar.update(n)
                bar.set_postfix(verified=summary.verified, kept=summary.kept)
            summary = synthesise(seeds, args.output, generator, index, config, limits, args.overwrite, progress,
                                 workers=args.workers)
    except GeneratorUnavailable as exc:
        print(f"instella data synth: error: {exc}\nthe seeds finished so far are kept in {args.output}.partial; "
              "rerun the same command to resume", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"instella data synth: error: {exc}", file=sys.stderr)
        return 2
    print(summary.report())
    print(f"wrote {args.output}, {args.output}.summary.json and {args.output}.summary.png")
    if summary.kept == 0:
        print("instella data synth: error: no problem was kept; the reasons above say why", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
