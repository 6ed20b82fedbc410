"""The ``instella`` command: one subcommand per tool, each defined in the module that implements it.

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only
when its subcommand is used, so ``instella --help`` stays fast.
"""
import argparse
import importlib
import sys

from instella_plugin.megatron_import import import_megatron_core

# name -> (module, one-line help)
SUBCOMMANDS = {
    "data": ("instella_plugin.data.cli", "tokenise to Megatron .bin/.idx, index token files, resolve blends, format SFT"),
    "convert": ("instella_plugin.hf.convert_cli", "Megatron dist checkpoint <-> Hugging Face directory"),
    "merge": ("instella_plugin.hf.merge_cli", "weight ensembling of checkpoints (mean, layer-wise, SLERP, TIES, "
                                            "DARE, greedy soup) and the seed-soup report"),
    "rope": ("instella_plugin.rope.cli", "RoPE base for a target context (scaling law)"),
    "layout": ("instella_plugin.training.layout", "check a parallel layout (TP x PP x CP x DP, batch arithmetic)"),
    "submit": ("instella_plugin.launch.submit", "Slurm batch submission from a recipe and a cluster profile"),
    "train": ("instella_plugin.training.entry", "the trainer (same as pretrain_gpt.py --plugin instella)"),
    "generate": ("instella_plugin.inference.cli", "text from a Megatron checkpoint (megatron-core inference, any TP/PP)"),
    "eval": ("instella_plugin.evaluation.cli", "benchmark a Megatron checkpoint or HF directory on local task data"),
    "synth": ("instella_plugin.synth.cli", "synthetic data from a generator (gsm8k); also `instella data synth`"),
}
# Subcommands whose work imports megatron-core: imported first with torch.compile deferred (see
# megatron_import); the others (and every --help) never import it.
NEEDS_MEGATRON = {"data", "convert", "merge", "train", "synth", "generate", "eval"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="instella", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from: {', '.join(SUBCOMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    if argv[:2] == ["data", "synth"]:  # synthesis sits above the data layer (it generates): its own module
        argv = argv[1:]
    name = argv[0]
    if name in NEEDS_MEGATRON and not {"-h", "--help"} & set(argv[1:]):
        import_megatron_core()
    module = importlib.import_module(SUBCOMMANDS[name][0])
    if hasattr(module, "main"):
        return module.main(argv[1:]) or 0
    sub_parser = argparse.ArgumentParser(prog=f"instella {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub_parser)
    return module.run(sub_parser.parse_args(argv[1:])) or 0


if __name__ == "__main__":
    sys.exit(main())
