"""Run-time patches of the upstream host (phase ``startup``), applied by ``PluginHost.hooks``.

Each wraps one ``megatron.training`` function, acts only when a plugin host exists (so importing this
module, or running Megatron-LM without ``--plugin``, changes nothing), and is listed in
``patches/README.md``:

- ``plugin_finalize_args`` (``initialize.validate_args``): the plugin's recipe defaults and checks run
  on the parsed args just before Megatron-LM validates them (``PluginHost.finalize``).
- ``plugin_weight_decay`` (``training.get_megatron_optimizer_config``): Megatron-LM always exempts
  biases and 1-D parameters from weight decay; a plugin run with ``--decay-all-params`` (Instella)
  drops that exemption, as our trainer does (``training/setup.py``).
- ``plugin_train_log`` (``training.training_log``): every iteration's loss, LR, grad norm and RoPE
  theta also go to ``SAVE/train_log.jsonl`` (our trainer's format; ``testing.trainer.read_log``).
- ``plugin_checkpoint_meta`` (``training.save_checkpoint``): after Megatron-LM writes a (synchronous,
  persistent) checkpoint, rank 0 adds ``instella_meta.json`` to its iteration directory: the plugin's
  ``checkpoint_meta`` plus the model config, so our tools (``--load``, ``instella convert``, merge)
  read the weights of checkpoints the upstream host wrote.
- ``plugin_legacy_qkv_fix`` (``checkpointing.fix_query_key_value_ordering``): our checkpoints carry no
  ``checkpoint_version``, which Megatron-LM reads as 0 and "fixes" the QKV ordering of legacy
  (pre-megatron-core) parameter names; megatron-core models have none of those names, so the fix
  is a no-op, except that it asserts a single model chunk and so fails with virtual pipeline stages.
  It runs only when a legacy name exists.
- ``helpers_for_this_python`` (``core.datasets.utils.compile_helpers``): Megatron-LM builds its dataset
  index helpers with ``make``, whose ``python3``/``python3-config`` may name another interpreter than
  the one running (Megatron-LM's ``.python-version`` says 3.12, so pyenv shims pick 3.12 inside the
  checkout); the build is skipped when the helpers already import and otherwise targets the running
  interpreter's include directory and extension suffix.
"""
import json
import os
import subprocess
import sys
import sysconfig

from instella_plugin.upstream.registry import register_patch

_HOST = None


def install_host(host) -> None:
    """Make ``host`` (a ``PluginHost``) the one the patches below consult; none acts without one."""
    global _HOST
    _HOST = host


def current_host():
    return _HOST


@register_patch("plugin_finalize_args", "megatron.training.initialize", "validate_args",
                reason="plugin recipe defaults/checks on the parsed args before Megatron-LM validates them")
def _finalize_args(original):
    def validate_args(args, defaults={}):  # noqa: B006  (Megatron-LM's signature)
        host = current_host()
        if host is not None:
            host.finalize(args)
        return original(args, defaults)
    return validate_args


@register_patch("plugin_weight_decay", "megatron.training.training", "get_megatron_optimizer_config",
                reason="--decay-all-params: weight decay on biases and 1-D params too (Instella)")
def _weight_decay(original):
    def get_megatron_optimizer_config(args):
        config, overrides = original(args)
        host = current_host()
        if host is not None and host.run is not None and host.run.flags.wd_exempt_1d is False and overrides:
            overrides = {k: v for k, v in overrides.items() if dict(v) != {"wd_mult": 0.0}}
        return config, overrides
    return get_megatron_optimizer_config


def _scalar(value):
    if value is None:
        return None
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None


@register_patch("plugin_train_log", "megatron.training.training", "training_log",
                reason="per-iteration loss/LR/grad norm/theta to SAVE/train_log.jsonl (our trainer's format)")
def _train_log(original):
    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs):
        host = current_host()
        if host is not None:
            _write_log_line(host, loss_dict, learning_rate, iteration, rest)
        return original(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs)
    return training_log


def _write_log_line(host, loss_dict, learning_rate, iteration, rest) -> None:
    import torch
    from megatron.training import get_args

    args = get_args()
    path = host.log_path(args)
    if not path or torch.distributed.get_rank() != torch.distributed.get_world_size() - 1:
        return
    grad_norm = rest[3] if len(rest) > 3 else None  # (loss_scale, report_memory_flag, skipped_iter, grad_norm, ...)
    record = {"iteration": int(iteration), "loss": _scalar(loss_dict.get("lm loss")) if loss_dict else None,
              "lr": _scalar(learning_rate), "grad_norm": _scalar(grad_norm), "rope_theta": host.current_theta(),
              "host": "megatron-lm"}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


@register_patch("helpers_for_this_python", "megatron.core.datasets.utils", "compile_helpers",
                reason="build the dataset index helpers for the running interpreter (or skip when built)")
def _compile_helpers(original):
    def compile_helpers():
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
            return None
        except ImportError:
            pass
        import pybind11

        folder = os.path.join(os.path.dirname(os.path.abspath(sys.modules[original.__module__].__file__)))
        includes = f"-I{sysconfig.get_paths()['include']} -I{pybind11.get_include()}"
        cmd = ["make", "-C", folder, f"LIBEXT={sysconfig.get_config_var('EXT_SUFFIX')}", f"CPPFLAGS={includes}"]
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"error: building megatron's dataset helpers failed ({' '.join(cmd)}); "
                             "it needs make, a C++ compiler and pybind11")
        return None
    return compile_helpers


@register_patch("plugin_checkpoint_meta", "megatron.training.training", "save_checkpoint",
                reason="instella_meta.json (plugin checkpoint_meta + model config) in each upstream checkpoint")
def _checkpoint_meta(original):
    def save_checkpoint(iteration, *args, **kwargs):
        out = original(iteration, *args, **kwargs)
        host = current_host()
        if host is not None and not kwargs.get("non_persistent_ckpt", False):
            host.write_checkpoint_meta(iteration, release=bool(kwargs.get("release", False)))
        return out
    return save_checkpoint


_LEGACY_QKV = (".query_key_value.weight", ".query_key_value.bias", ".key_value.weight", ".key_value.bias")


@register_patch("plugin_legacy_qkv_fix", "megatron.training.checkpointing", "fix_query_key_value_ordering",
                reason="legacy QKV reordering (no-op for megatron-core names) asserts one chunk; skipped without "
                       "legacy names")
def _legacy_qkv_fix(original):
    def fix_query_key_value_ordering(model, checkpoint_version):
        chunks = model if isinstance(model, list) else [model]
        if current_host() is not None and not any(
                name.endswith(_LEGACY_QKV) for chunk in chunks for name, _ in chunk.named_parameters()):
            return None
        return original(model, checkpoint_version)
    return fix_query_key_value_ordering
