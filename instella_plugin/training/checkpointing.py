"""Checkpoints in megatron's distributed format, written atomically, with the model configuration inside.

The directory layout, the metadata record and the tracker-last publish are ``checkpoint_layout``'s;
this module writes and reads the tensors. A save goes to ``iter_N.partial`` and is renamed to
``iter_N`` once every rank has written; the tracker is replaced last. A crash at any point leaves the
previous tracker naming a complete checkpoint. The sharded state holds the model (global keys, so it
loads at any TP/PP/VPP), the optimizer (``fully_sharded_model_space``: any DP/TP/PP), per-rank RNG,
and in its common part the scheduler, iteration and consumed samples. Weights-only checkpoints
(converter, merge) list just ``"model"`` in ``contents``.
"""
import logging
import multiprocessing
import os
import shutil
from typing import List, Optional

import torch

from instella_plugin.checkpoint_layout import (META, TRACKER, CheckpointError, CheckpointMeta, iteration_dir,
                                               latest_iteration, publish, read_meta, resolve_checkpoint_dir)
from instella_plugin.megatron_fixes import unshare_adam_steps
from instella_plugin import checkpoint_check
from instella_plugin.training.model_setup import unwrap

log = logging.getLogger(__name__)

# Optimizer state that reshards across DP, TP and PP (the distributed optimizer included).
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
__all__ = ["META", "TRACKER", "CheckpointError", "iteration_dir", "latest_iteration", "read_meta",
           "resolve_checkpoint_dir", "parallel_layout", "save_checkpoint", "load_checkpoint", "load_model_weights"]


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def model_sharded_state_dict(model_chunks) -> dict:
    """Megatron-LM's layout: ``model`` (or ``model0``, ``model1``... with virtual pipeline stages)."""
    chunks = [unwrap(m) for m in model_chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(chunks)}


def _rng_sharded_object():
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def parallel_layout() -> dict:
    """This run's parallel layout, as ``CheckpointMeta.layout`` records it."""
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "cp": ps.get_context_parallel_world_size()}


def save_checkpoint(save_dir: str, iteration: int, model_chunks: List[torch.nn.Module], cfg=None, *,
                    optimizer=None, scheduler=None, consumed_samples: int = 0, extra_meta: Optional[dict] = None,
                    save_rng: bool = True) -> str:
    """Write a checkpoint atomically (collective over all ranks); return its directory."""
    from megatron.core import dist_checkpointing

    final = iteration_dir(save_dir, iteration)
    partial = final + ".partial"
    if _rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        if os.path.exists(partial):
            shutil.rmtree(partial)  # left by a crashed save
        os.makedirs(partial)
    _barrier()
    state = model_sharded_state_dict(model_chunks)
    contents = ["model"]
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=_OPTIM_METADATA)
        contents.append("optimizer")
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
        contents.append("scheduler")
    if save_rng:
        state["rng_state"] = _rng_sharded_object()
        contents.append("rng")
    state["iteration"] = iteration
    state["consumed_samples"] = consumed_samples
    contents.append("data")
    dist_checkpointing.save(state, partial)
    _barrier()
    if os.environ.get("INSTELLA_CKPT_FAULT") == str(iteration):  # fault injection for the atomicity test
        log.error("INSTELLA_CKPT_FAULT=%s: exiting mid-save", iteration)
        for child in multiprocessing.active_children():  # the checkpoint writer's helpers
            child.kill()
        os._exit(17)
    if _rank() == 0:
        publish(save_dir, CheckpointMeta(iteration, consumed_samples, tuple(contents), parallel_layout(),
                                         cfg.to_dict() if cfg is not None else None, dict(extra_meta or {})),
                staging=partial)
    _barrier()
    return final


def _initialize_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer its (zero) state before a checkpoint is loaded into it.

    With torch's AdamW (megatron's fallback without TE/apex) the distributed optimizer's
    ``state_dict`` reads Adam's ``step`` from every parameter's state, which a fresh optimizer does
    not have yet; megatron's own initialiser creates the moments but not the step.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(opt, "init_state_fn", None)
        inner = getattr(opt, "optimizer", None)
        if init is None or inner is None:
            continue
        init(inner, getattr(opt, "config", None))
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].setdefault("step", torch.tensor(0.0))


def load_checkpoint(path: str, model_chunks, *, optimizer=None, scheduler=None, load_rng: bool = True,
                    new_run: bool = False) -> dict:
    """Load what the checkpoint holds into the given objects (collective); return its meta + state.

    ``optimizer=None`` / ``scheduler=None`` skip those parts. RNG state is restored only when the
    parallel layout matches the one that saved it. ``new_run`` (stage 2 from stage 1): the optimizer
    keeps its loaded moments and step count but the param groups' ``max_lr``/``min_lr`` stay this
    run's, not the checkpoint's (megatron stores them per group and the scheduler reads them).
    """
    from megatron.core import dist_checkpointing

    ckpt = resolve_checkpoint_dir(path)
    checkpoint_check.check_readable(ckpt, "--load")
    meta = read_meta(ckpt)
    contents = set(meta.get("contents", ["model"]))
    state = model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        if "optimizer" not in contents:
            raise CheckpointError(f"{ckpt} holds no optimizer state (weights only: {sorted(contents)}); "
                                  "load it with --finetune or --no-load-optim")
        _initialize_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=_OPTIM_METADATA)
    saved, here = meta.get("layout") or {}, parallel_layout()
    rng = load_rng and "rng" in contents and (saved.get("tp"), saved.get("pp")) == (here["tp"], here["pp"])
    if rng:
        state["rng_state"] = _rng_sharded_object()
    loaded = dist_checkpointing.load(state, ckpt)
    for i, m in enumerate(model_chunks):
        unwrap(m).load_state_dict(loaded["model" if len(model_chunks) == 1 else f"model{i}"], strict=True)
    if optimizer is not None:
        fresh = [{k: g[k] for k in ("max_lr", "min_lr") if k in g} for g in optimizer.param_groups]
        optimizer.load_state_dict(loaded["optimizer"])
        unshare_adam_steps(optimizer)
        if new_run:
            for group, values in zip(optimizer.param_groups, fresh):
                group.update(values)
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if rng:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        r = loaded["rng_state"]
        torch.set_rng_state(r["cpu"])
        if "cuda" in r and torch.cuda.is_available():
            torch.cuda.set_rng_state(r["cuda"])
        get_cuda_rng_tracker().set_states(r["tracker"])
    meta["rng_restored"] = bool(rng)
    meta["iteration"] = int(loaded.get("iteration", meta.get("iteration", 0)))
    meta["consumed_samples"] = int(loaded.get("consumed_samples", meta.get("consumed_samples", 0)))
    return meta


def load_model_weights(path: str, model_chunks) -> dict:
    """Weights only (converter, merge, evaluation)."""
    return load_checkpoint(path, model_chunks, load_rng=False)
