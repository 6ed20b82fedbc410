"""``instella merge``: weight ensembling of N checkpoints (Megatron or Hugging Face), and the seed-soup report.

    instella merge --inputs seed_5796/checkpoints seed_6198/checkpoints seed_8915/checkpoints --output merged
    instella merge --inputs a/ b/ --weights 0.7 0.3 --output ab/ --dtype bfloat16
    instella merge --method layerwise --inputs a/ b/ --weights 1,0 0,1 --output ab/
    instella merge --method slerp --inputs a/ b/ --t 0.3 --output ab/
    instella merge --method ties --inputs a/ b/ c/ --base stage1/ --density 0.5 --output t/
    instella merge --method dare --combine ties --inputs a/ b/ --base stage1/ --density 0.3 --seed 1 --output d/
    instella merge --method greedy-soup --inputs a/ b/ c/ --heldout data/valid_text_document --output soup/
    instella merge --config merge.yaml --output out/          # mergekit-style YAML (docs/merge.md)
    instella merge report --inputs a/ b/ c/ --base stage1/ --heldout-blend tiny --data-root data/ --output rep/

Uniform mean by default; ``--weights`` are relative (divided by their sum; a comma list is a per-layer
schedule). Accumulation is fp32. Everything is checked before the first tensor is read.
"""
import argparse
import sys
import time

from instella_plugin.hf.convert_cli import parse_size

METHOD_NAMES = ("uniform", "weighted", "layerwise", "slerp", "ties", "dare", "greedy-soup",
                "linear", "dare_linear", "dare_ties")
ERRORS = (ValueError, FileExistsError, FileNotFoundError, KeyError, RuntimeError)


def add_evaluator_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation (greedy soup, report)")
    g.add_argument("--heldout", nargs="+", metavar="PREFIX", help="held-out Megatron .bin/.idx prefixes: score = loss")
    g.add_argument("--heldout-blend", metavar="NAME", help="score = loss on the valid split of this blend")
    g.add_argument("--data-root", help="where --heldout-blend's files are")
    g.add_argument("--eval-samples", type=int, default=32, help="held-out windows scored (default 32)")
    g.add_argument("--eval-seq-length", type=int, default=128, help="tokens per window (default 128)")
    g.add_argument("--score-command", metavar="CMD",
                   help="instead of held-out loss: a command with {checkpoint} that prints a score last "
                        "(e.g. an `instella eval` run on a dev suite)")
    g.add_argument("--higher-is-better", action="store_true", help="--score-command's score: higher is better")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", nargs="+", help="checkpoints to merge (all Megatron or all HF)")
    p.add_argument("--output", required=True, help="output directory (created atomically)")
    p.add_argument("--config", help="a mergekit-style YAML merge config (method, models, parameters)")
    p.add_argument("--method", choices=METHOD_NAMES, help="merge method (default: uniform, or weighted with --weights)")
    p.add_argument("--weights", nargs="+", help="one weight per input: a number, or a comma list (per-layer schedule)")
    p.add_argument("--base", help="ties, dare: the checkpoint the task vectors are taken against")
    p.add_argument("--t", help="slerp: 0 is the first input, 1 the second; a comma list is a per-layer schedule")
    p.add_argument("--density", nargs="+", type=float, help="ties, dare: fraction kept, in (0, 1]; one or one per input")
    p.add_argument("--lambda", dest="lam", type=float, help="ties, dare: scale of the merged task vector (default 1)")
    p.add_argument("--no-normalize", action="store_true", help="ties, dare: do not divide by the weight sum")
    p.add_argument("--combine", choices=("linear", "ties"), help="dare: how the dropped task vectors combine")
    p.add_argument("--rescale", choices=("inverse", "l1", "none"),
                   help="dare: survivors times 1/density (inverse, default), to the L1 norm (mergekit), or none")
    p.add_argument("--seed", type=int, help="dare: seed of the drop masks (default 0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="output dtype (default: the first input's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard of an HF output")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory that holds a model")
    add_evaluator_arguments(p)


def build_evaluator(args):
    from instella_plugin.hf import merge_eval  # transformers' modeling stack: seconds; only when scoring

    if args.score_command:
        return merge_eval.CommandScore(args.score_command, higher_is_better=args.higher_is_better)
    prefixes = merge_eval.heldout_prefixes(args.heldout, args.heldout_blend, args.data_root)
    evaluator = merge_eval.HeldOutLoss(prefixes, seq_length=args.eval_seq_length, num_samples=args.eval_samples)
    evaluator.windows()  # too little held-out data is refused now, before any checkpoint is read
    return evaluator


def spec_from_args(args):
    from instella_plugin.hf.merge_config import build_spec, load_spec, parse_schedule

    if args.config:
        flags = {"--inputs": args.inputs, "--method": args.method, "--weights": args.weights, "--base": args.base,
                 "--t": args.t, "--density": args.density, "--lambda": args.lam, "--combine": args.combine,
                 "--rescale": args.rescale, "--seed": args.seed, "--no-normalize": args.no_normalize or None}
        both = [k for k, v in flags.items() if v is not None]
        if both:
            raise ValueError(f"{', '.join(both)} and --config: give the merge in one place (the config's models "
                             "and parameters, or the flags)")
        return load_spec(args.config)
    if not args.inputs:
        raise ValueError("give --inputs (or --config)")
    return build_spec(args.method, args.inputs, weights=None if args.weights is None else [parse_schedule(w) for w in args.weights],
                      base=args.base, t=None if args.t is None else parse_schedule(args.t), density=args.density,
                      lam=args.lam, normalize=False if args.no_normalize else None, combine=args.combine,
                      rescale=args.rescale, seed=args.seed, dtype=args.dtype)


def run(args) -> int:
    from instella_plugin.hf.convert import parse_dtype  # torch.distributed.checkpoint: a second; not for --help
    from instella_plugin.hf.merge import merge

    start = time.time()
    try:
        spec = spec_from_args(args)
        kwargs = {}
        if args.max_shard_size != "5GB":
            kwargs["max_shard_bytes"] = parse_size(args.max_shard_size)
        dtype = parse_dtype(args.dtype or spec.dtype)
        if spec.method == "greedy-soup":
            from instella_plugin.hf.merge_soup import greedy_soup

            soup = greedy_soup(spec.inputs, args.output, build_evaluator(args), dtype=dtype, overwrite=args.overwrite)
            print(f"greedy soup: {len(soup['ingredients'])} of {len(spec.inputs)} inputs kept, score {soup['score']:.4f}")
        else:
            merge(spec.inputs, args.output, dtype=dtype, overwrite=args.overwrite, spec=spec, log=print, **kwargs)
    except ERRORS as e:
        print(f"instella merge: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(spec.inputs)} checkpoints ({spec.method}) into {args.output} in {time.time() - start:.1f}s")
    return 0


def report_main(argv) -> int:
    p = argparse.ArgumentParser(prog="instella merge report",
                                description="score every input, every merge method and the interpolation "
                                            "between every pair of inputs; write a markdown table and plots")
    p.add_argument("--inputs", nargs="+", required=True, help="checkpoints (e.g. the stage-2 seeds)")
    p.add_argument("--base", help="the checkpoint they started from (for ties and dare; scored as a reference)")
    p.add_argument("--output", required=True, help="report directory: report.md, report.json, methods.png, barrier.png")
    p.add_argument("--methods", nargs="+", metavar="LABEL", help="a subset of the method list (default: all)")
    p.add_argument("--methods-config", help="a method-list YAML instead of the bundled merge_report.yaml")
    p.add_argument("--points", type=int, default=5, help="points on each pair's interpolation line (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report directory")
    add_evaluator_arguments(p)
    args = p.parse_args(argv)
    from instella_plugin.hf.merge_report import load_methods, seed_soup_report

    try:
        methods = load_methods(args.methods_config, args.methods)
        report = seed_soup_report(args.inputs, args.output, build_evaluator(args), base=args.base, methods=methods,
                                  points=args.points, overwrite=args.overwrite)
    except ERRORS as e:
        print(f"instella merge report: {e}", file=sys.stderr)
        return 2
    worst = max(report["barriers"], key=lambda b: b["barrier"]) if report["barriers"] else None
    print(f"report written to {args.output}: best method {report['best_method']}"
          + (f", largest barrier {worst['barrier']:+.4f}" if worst else "") + f" ({report['seconds']:.0f}s)")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "report":
        return report_main(argv[1:])
    p = argparse.ArgumentParser(prog="instella merge", description=__doc__.splitlines()[0],
                                epilog="instella merge report --help: the seed-soup report")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
