"""Command-line arguments with Megatron-LM's flag names, plus the plugin's own.

``parse_args(argv)`` reads ``--plugin`` first, loads the plugin (it adds its flags), parses
everything, records which flags were given explicitly (recipes never override those) and builds the
frozen run configuration (``run_config.py``), which validates everything before anything expensive
starts.
"""
import argparse
import os
import sys
from typing import Optional, Sequence

from instella_plugin.flag_types import non_negative_int, positive_float, positive_int
from instella_plugin.training.plugins import installed_plugins, load_plugin
from instella_plugin.training.run_config import build_run_config


def _model_args(p):
    g = p.add_argument_group("model (Megatron-LM names)")
    g.add_argument("--num-layers", type=positive_int)
    g.add_argument("--hidden-size", type=positive_int)
    g.add_argument("--num-attention-heads", type=positive_int)
    g.add_argument("--num-query-groups", type=positive_int)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--ffn-hidden-size", type=positive_int)
    g.add_argument("--seq-length", type=positive_int)
    g.add_argument("--max-position-embeddings", type=positive_int)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--normalization", default="RMSNorm", choices=["RMSNorm", "LayerNorm"])
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--position-embedding-type", default="rope", choices=["rope", "learned_absolute", "none"])
    g.add_argument("--rotary-base", type=positive_float)
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--vocab-size", type=positive_int)
    g.add_argument("--padded-vocab-size", type=positive_int)
    g.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=128)
    g.add_argument("--spec", nargs="+", help="layer spec name (or Megatron-LM's MODULE ATTR)")
    g.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"])


def _parallel_args(p):
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=positive_int)
    g.add_argument("--context-parallel-size", type=positive_int, default=1)
    g.add_argument("--cp-comm-type", default="a2a", choices=["a2a", "p2p", "all_gather", "a2a+p2p"])
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA/ROCm when a GPU exists, else the CPU mode with gloo")


def _training_args(p):
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=positive_int, default=1)
    g.add_argument("--global-batch-size", type=positive_int)
    g.add_argument("--train-iters", type=positive_int)
    g.add_argument("--exit-interval", type=positive_int)
    g.add_argument("--exit-duration-in-mins", type=positive_float)
    g.add_argument("--exit-signal-handler", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--lr", type=float)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="linear", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    g.add_argument("--lr-warmup-iters", type=non_negative_int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-decay-iters", type=positive_int)
    g.add_argument("--recompute-granularity", choices=["full", "selective"])
    g.add_argument("--recompute-method", choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=positive_int)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--decoupled-weight-decay-exempt-1d", dest="wd_exempt_1d", action="store_true", default=None,
                   help="Megatron's default: no weight decay on biases and 1-D params (Instella decays everything)")


def _checkpoint_args(p):
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save")
    g.add_argument("--load")
    g.add_argument("--save-interval", type=positive_int)
    g.add_argument("--pretrained-checkpoint", help="start a new run from this checkpoint when --load/--save holds none "
                   "(stage 2 from stage 1, SFT from the merged model); the recipe says what is kept")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true", help="load weights only; reset iteration, optimizer, scheduler")
    g.add_argument("--reset-iteration", action="store_true",
                   help="load weights and optimizer state (Adam's step count included), reset iteration, "
                        "consumed samples and the LR scheduler (Instella stage 2, long phase 2)")
    g.add_argument("--use-checkpoint-args", action="store_true")
    g.add_argument("--ckpt-format", default="torch_dist", choices=["torch_dist"])


def _data_args(p):
    g = p.add_argument_group("data and logging")
    g.add_argument("--data-path", nargs="*")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--per-split-data-args-path")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--tokenizer-type", default="HuggingFaceTokenizer", choices=["HuggingFaceTokenizer", "NullTokenizer"])
    g.add_argument("--tokenizer-model")
    g.add_argument("--data-cache-path")
    g.add_argument("--eval-interval", type=positive_int)
    g.add_argument("--eval-iters", type=non_negative_int, default=10)
    g.add_argument("--skip-train", action="store_true", help="load, evaluate on the validation split, exit")
    g.add_argument("--log-interval", type=positive_int, default=10)
    g.add_argument("--tensorboard-dir")
    g.add_argument("--wandb-project")
    g.add_argument("--wandb-exp-name")
    g.add_argument("--wandb-save-dir")
    g.add_argument("--no-plot", action="store_true", help="skip the loss-curve PNG at the end of a run")


def build_parser(plugin=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain_gpt.py", description="Megatron-Core GPT pre-training with plugins",
                                allow_abbrev=False)
    p.add_argument("--plugin", help="a plugin from the 'megatron_plugins' entry-point group (e.g. instella)")
    for add in (_model_args, _parallel_args, _training_args, _checkpoint_args, _data_args):
        add(p)
    if plugin is not None:
        plugin.add_arguments(p)
    return p


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """Destinations of the flags given on the command line (so recipes fill only the rest)."""
    shadow = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        kwargs = dict(dest=action.dest, default=argparse.SUPPRESS)
        if action.nargs == 0:
            kwargs["action"] = "store_const"
            kwargs["const"] = True
        else:
            kwargs["nargs"] = action.nargs
        shadow.add_argument(*action.option_strings, **kwargs)
    ns, _ = shadow.parse_known_args(argv)
    return set(vars(ns))


def parse_args(argv: Optional[Sequence[str]] = None):
    """(the frozen ``RunConfig``, the plugin) for a command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--plugin")
    known, _ = pre.parse_known_args(argv)
    plugin = load_plugin(known.plugin)
    parser = build_parser(plugin)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{_plugin_hint(argv, unknown, known.plugin)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return build_run_config(namespace, explicit_dests(parser, argv), plugin, world), plugin


def _plugin_hint(argv, unknown, current) -> str:
    """'; they are flags of plugin X: add --plugin X' when an installed plugin knows every one of them."""
    for name in sorted(installed_plugins()):
        if name == current:
            continue
        try:
            _, left = build_parser(load_plugin(name)).parse_known_args(argv)
        except (SystemExit, Exception):  # noqa: BLE001  (a broken plugin gives no hint, not a new error)
            continue
        if not left:
            return f" (flags of the {name!r} plugin: add --plugin {name})"
    return ""
