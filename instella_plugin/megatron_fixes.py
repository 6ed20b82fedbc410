"""Run-time fixes to megatron-core 0.16.1 that the trainer needs, each idempotent and conditional.

Listed again in ``patches/README.md``. Each fix names the megatron function it wraps, the
condition under which it applies, and why.

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
import functools

import torch

_APPLIED = set()


def fix_distributed_optimizer_step_on_load() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    if "dist_opt_step" in _APPLIED or distrib_optimizer.HAVE_APEX_OR_TE:
        return False
    cls = distrib_optimizer.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states

    @functools.wraps(original)
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

    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    _APPLIED.add("dist_opt_step")
    return True


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
    return [name for name, fix in (("dist_opt_step", fix_distributed_optimizer_step_on_load),) if fix()]
