"""Run-time fixes to megatron-core 0.16.1 that the trainer needs, each idempotent and conditional.

Fix 1 is a patch of the package's registry (``instella_plugin.patching``): ``FIXES.describe()``
prints its target, the version it was written for and why; a megatron-core whose target moved fails
naming both versions. Fix 2 patches nothing (a function the trainer calls after each load).

1. ``DistributedOptimizer._set_main_param_and_optimizer_states`` (applies when neither Transformer
   Engine nor apex is installed, i.e. megatron falls back to ``torch.optim.AdamW``): loading a
   ``fully_reshardable`` distributed-optimizer checkpoint restores Adam's ``step`` from the param
   groups first, then copies every key of the parameter's state from the checkpoint tensors, which
   do not carry ``step`` (it is kept per group) -> ``KeyError: 'step'``. The fix copies the keys the
   checkpoint has and leaves the already-restored ``step`` alone.
2. ``DistributedOptimizer.load_state_dict`` (same condition) assigns *one* ``step`` tensor to the
   state of every parameter; torch's AdamW increments each parameter's step in place, so after a
   load the shared step advances once per parameter per iteration (bias corrections go wrong and
   resume is not exact). ``unshare_adam_steps(optimizer)``, called after every load, gives each
   parameter its own copy.
"""
import importlib

import torch

from instella_plugin.patching import PatchRegistry

_DISTRIB_OPTIMIZER = "megatron.core.optimizer.distrib_optimizer"

FIXES = PatchRegistry("megatron_fixes", package="megatron-core", version="0.16.1",
                      hint="update instella_plugin/megatron_fixes.py for the new code")


def _torch_adamw_fallback() -> bool:
    """Neither Transformer Engine nor apex: megatron's distributed optimizer runs torch's AdamW."""
    return not importlib.import_module(_DISTRIB_OPTIMIZER).HAVE_APEX_OR_TE


@FIXES.register("dist_opt_step", _DISTRIB_OPTIMIZER, "DistributedOptimizer._set_main_param_and_optimizer_states",
                signature=("self", "model_param", "tensors"), condition=_torch_adamw_fallback,
                reason="fully_reshardable loads copy every state key from checkpoint tensors that carry no "
                       "'step' (KeyError); copy the keys they have, keep the restored step")
def _copy_state_without_step(original):
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            dst = {"param": main_param, **{k: v for k, v in state.items() if k != "step"}}
            for key, value in dst.items():
                value.copy_(tensors[key])
            return
        return original(self, model_param, tensors)
    return _set_main_param_and_optimizer_states


def fix_distributed_optimizer_step_on_load() -> bool:
    """Apply fix 1 when its condition holds; returns whether this call applied it."""
    return bool(FIXES.apply(["dist_opt_step"]))


def unshare_adam_steps(optimizer) -> None:
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def apply_all() -> list:
    """Apply every fix whose condition holds; return the names applied in this call."""
    return FIXES.apply()
