"""``instella eval``: benchmark a Megatron checkpoint or a Hugging Face directory on local task data.

    instella eval --load CKPT | --hf DIR  (--tasks a,b | --suite instella-base) --data-dir DIR
                  [--limit N] [--output results.json] [--log-samples]
    instella eval fetch (--tasks a,b | --suite NAME) --data-dir DIR     # once, with network access
    instella eval compare RUN.json... [--plot scores.png]
    instella eval niah --load CKPT --lengths 4K,8K --depths 0,0.5,1 --output-dir OUT   # long context

Tasks and data are checked (files found, fields present, shots available) before the model loads;
prompts against the model's context before scoring. Under ``torchrun`` the data-parallel ranks
split the examples; rank 0 prints the table and writes the JSON.
"""
import argparse
import os
import sys
import time

# Each action imports what it runs (torch, the backends, megatron-core: seconds), so that
# `instella eval --help` and a refused flag answer at once.

DTYPE_CHOICES = ("bfloat16", "float16", "float32")


def add_arguments(p: argparse.ArgumentParser) -> None:
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--load", help="Megatron checkpoint directory (any TP/PP layout)")
    model.add_argument("--hf", help="Hugging Face model directory")
    _task_arguments(p)
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task (subtask)")
    p.add_argument("--output", default=None, help="results JSON (written atomically)")
    p.add_argument("--log-samples", action="store_true", help="keep per-example records in the JSON")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on generation tasks' max_new_tokens (dry runs; recorded in the JSON)")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="--load: TP to run at")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="--load: PP to run at")


def _task_arguments(p):
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tasks", help="comma-separated task names or task YAML paths")
    which.add_argument("--suite", help="a named suite, e.g. instella-base")
    p.add_argument("--data-dir", required=True, help="local task data (see docs/evaluation.md)")


def _distributed() -> None:
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def run(args) -> int:
    import torch

    from instella_plugin.evaluation import results as R
    from instella_plugin.evaluation.runner import evaluate, prepare
    from instella_plugin.evaluation.task_config import cap_new_tokens, resolve_tasks

    if args.dtype is None:
        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit must be >= 1, got {args.limit}")
    tasks = resolve_tasks(args.tasks, args.suite)
    if args.max_new_tokens is not None:
        if args.max_new_tokens < 1:
            raise SystemExit(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        tasks = [cap_new_tokens(t, args.max_new_tokens) for t in tasks]
    prepared = prepare(tasks, args.data_dir, args.limit)
    if args.hf:
        from instella_plugin.evaluation.hf_backend import HFBackend

        _distributed()
        backend = HFBackend(args.hf, dtype=args.dtype, batch_size=args.batch_size)
    else:
        from instella_plugin.evaluation.megatron_backend import MegatronBackend

        backend = MegatronBackend(args.load, tp=args.tensor_model_parallel_size,
                                  pp=args.pipeline_model_parallel_size, dtype=args.dtype,
                                  batch_size=args.batch_size)
    leader = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    log = print if leader else None
    start = time.time()
    out = evaluate(tasks, backend, prepared=prepared, log=log)
    if leader:
        print(R.table(out["results"]))
        print(f"{sum(r['n'] for r in out['results'].values())} examples in {time.time() - start:.1f}s")
        if args.output:
            record = R.run_record(out, backend.description, args.limit, args.log_samples)
            record["max_new_tokens_cap"] = args.max_new_tokens
            R.write_results(args.output, record)
            print(f"wrote {args.output}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["niah"]:  # needle in a haystack over lengths x depths (long_context_cli)
        from instella_plugin.evaluation import long_context_cli

        return long_context_cli.main(argv[1:])
    if argv[:1] == ["fetch"]:
        p = argparse.ArgumentParser(prog="instella eval fetch", description="download task data once (network)")
        _task_arguments(p)
        args = p.parse_args(argv[1:])
        from instella_plugin.evaluation.fetch import fetch
        from instella_plugin.evaluation.task_config import resolve_tasks

        fetch(resolve_tasks(args.tasks, args.suite), args.data_dir)
        return 0
    if argv[:1] == ["compare"]:
        p = argparse.ArgumentParser(prog="instella eval compare", description="scores of several runs side by side")
        p.add_argument("runs", nargs="+", help="results JSON files of `instella eval --output`")
        p.add_argument("--plot", default=None, help="PNG of the primary scores per task")
        args = p.parse_args(argv[1:])
        from instella_plugin.evaluation import results as R

        records = [R.read_results(path) for path in args.runs]
        names = [os.path.splitext(os.path.basename(path))[0] for path in args.runs]
        print(R.compare_table(names, records))
        if args.plot:
            from instella_plugin.evaluation.compare import plot_scores

            plot_scores(names, records, args.plot)
            print(f"wrote {args.plot}")
        return 0
    p = argparse.ArgumentParser(prog="instella eval", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
