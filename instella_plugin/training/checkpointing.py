"""Checkpoints in megatron's distributed format, written atomically, with the model configuration inside.

Layout of a save directory (Megatron-LM's convention)::

    SAVE/latest_checkpointed_iteration.txt   tracker: the last complete iteration (written last)
    SAVE/iter_0000100/                        megatron dist_checkpointing (torch_dist) directory
    SAVE/iter_0000100/instella_meta.json      model config, spec, RoPE theta, contents, args

A save goes to ``iter_N.partial`` and is renamed to ``iter_N`` once every rank has written; the
tracker is replaced last. A crash at any point leaves the previous tracker naming a complete
checkpoint. The sharded state holds the model (global keys, so it loads at any TP/PP/VPP), the
optimizer (``fully_sharded_model_space``: any DP/TP/PP), per-rank RNG, and in its common part the
scheduler, iteration and consumed samples. Weights-only checkpoints (converter, merge) list just
``"model"`` in ``contents``.
"""
import json
import logging
import os
import shutil
from typing import List, Optional

import torch

from instella_plugin.training import checkpoint_check
from instella_plugin.training.model_setup import unwrap

log = logging.getLogger(__name__)

# Optimizer state that reshards across DP, TP and PP (the distributed optimizer included).
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
TRACKER = "latest_checkpointed_iteration.txt"
META = "instella_meta.json"


class CheckpointError(RuntimeError):
    pass


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def latest_iteration(save_dir: str) -> Optional[int]:
    """The iteration the tracker names, None when the directory holds no checkpoint at all."""
    tracker = os.path.join(save_dir, TRACKER)
    if not os.path.isfile(tracker):
        return None
    text = open(tracker, encoding="utf-8").read().strip()
    try:
        it = 0 if text == "release" else int(text)
    except ValueError:
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number; fix or remove the tracker")
    path = iteration_dir(save_dir, it) if text != "release" else os.path.join(save_dir, "release")
    if not os.path.isfile(os.path.join(path, "metadata.json")) or not os.path.isfile(os.path.join(path, META)):
        raise CheckpointError(f"{tracker} names iteration {text}, but {path} is missing or incomplete "
                              "(no metadata.json / instella_meta.json); point the tracker at a complete iteration")
    return it


def resolve_checkpoint_dir(path: str) -> str:
    """An iteration directory from a save directory (via its tracker) or an iteration directory itself."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    it = latest_iteration(path)
    if it is None:
        raise CheckpointError(f"{path} holds no checkpoint (no {TRACKER})")
    return iteration_dir(path, it)


def read_meta(path: str) -> dict:
    with open(os.path.join(resolve_checkpoint_dir(path), META), encoding="utf-8") as f:
        return json.load(f)


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


def _layout() -> dict:
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
        import multiprocessing

        log.error("INSTELLA_CKPT_FAULT=%s: exiting mid-save", iteration)
        for child in multiprocessing.active_children():  # the checkpoint writer's helpers
            child.kill()
        os._exit(17)
    if _rank() == 0:
        meta = {"iteration": iteration, "consumed_samples": consumed_samples, "contents": contents,
                "layout": _layout(), "model": cfg.to_dict() if cfg is not None else None}
        meta.update(extra_meta or {})
        with open(os.path.join(partial, META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, default=str)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(partial, final)
        tmp = os.path.join(save_dir, TRACKER + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(save_dir, TRACKER))
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
    rng = load_rng and "rng" in contents and meta.get("layout", {}).get("tp") == _layout()["tp"] \
        and meta.get("layout", {}).get("pp") == _layout()["pp"]
    if rng:
        state["rng_state"] = _rng_sharded_object()
    loaded = dist_checkpointing.load(state, ckpt)
    for i, m in enumerate(model_chunks):
        unwrap(m).load_state_dict(loaded["model" if len(model_chunks) == 1 else f"model{i}"], strict=True)
    if optimizer is not None:
        from instella_plugin.megatron_fixes import unshare_adam_steps

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
