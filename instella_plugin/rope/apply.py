"""Apply a RoPE theta to built megatron models, and the resume rule for theta.

megatron's ``RotaryEmbedding`` computes ``inv_freq`` once in ``__init__`` (fp32, not in the state
dict) and memoises ``forward`` with ``functools.lru_cache``, so after a plain attribute change it
would keep serving tables for the old base. ``set_rotary_base`` recomputes ``inv_freq`` with
megatron's own formula (fp32, on the tensor's current device), clears the ``forward`` cache (it is
per class, so every instance's stale entries go) and GPTModel's inference cos/sin cache, and records
the base on the module as ``rotary_base``. It acts on every ``RotaryEmbedding`` inside the given
chunks (DDP- or Float16Module-wrapped or not): each pipeline stage builds its own, and the TP ranks
of a stage each hold one, so calling it on every rank with the same theta keeps them consistent.

Checkpoints store the theta in force (``rope_meta``); ``check_resume_theta`` refuses a silent
change on resume.
"""
import math
from typing import List, Optional

import torch

from instella_plugin.checkpoint_layout import CheckpointError, read_meta
from instella_plugin.rope.methods import RopeScaling, plain_inv_freq

META_KEY = "rope_theta"


def _rotary_modules(model_chunks) -> List[torch.nn.Module]:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    found = []
    for chunk in chunks:
        for m in chunk.modules():
            if isinstance(m, RotaryEmbedding) and all(m is not f for f in found):
                found.append(m)
    return found


inv_freq_for = plain_inv_freq  # megatron's ``1 / theta ** (arange(0, dim, 2) / dim)`` in fp32


def set_rotary_base(model_chunks, theta: float, scaling: Optional[RopeScaling] = None) -> int:
    """Switch every RotaryEmbedding in ``model_chunks`` to base ``theta``; returns how many changed.

    ``scaling``: a context-extension method (``rope.methods``) whose inverse frequencies replace plain
    RoPE's at this base (its attention factor, for YaRN, is the softmax scale set at build time); by
    default the method each module recorded (``set_rope_scaling``), else plain RoPE.

    Raises if the chunks hold none (a model built without RoPE) or if one uses llama-3 style
    ``rope_scaling`` (not an Instella setting; its frequencies are not a plain function of theta).
    """
    if not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 1):
        raise ValueError(f"RoPE theta must be a finite number > 1, got {theta!r}")
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    modules = _rotary_modules(model_chunks)
    if not modules:
        raise ValueError("set_rotary_base: no megatron RotaryEmbedding in these model chunks "
                         "(was the model built with position_embedding_type='rope'?)")
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    owners = [m for chunk in chunks for m in chunk.modules() if hasattr(m, "rotary_pos_emb")]
    if any(getattr(m, "rotary_scaling", False) for m in owners):
        raise ValueError("set_rotary_base does not support llama-3 rope_scaling models (not an Instella setting)")
    for m in modules:
        old = m.inv_freq
        dim = 2 * old.numel()
        method = scaling if scaling is not None else getattr(m, "rope_scaling", None)
        m.inv_freq = (method.inv_freq(float(theta), dim, device=old.device) if method is not None
                      else inv_freq_for(float(theta), dim, device=old.device))
        m.rotary_base = float(theta)
    RotaryEmbedding.forward.cache_clear()
    for m in owners:  # GPTModel: its record of the base and its inference cos/sin cache
        if hasattr(m, "rotary_base"):
            m.rotary_base = float(theta)
        cache = getattr(m, "rotary_pos_emb_cache", None)
        if isinstance(cache, dict):
            cache.clear()
    return len(modules)


def set_rope_scaling(model_chunks, scaling: RopeScaling, theta: float) -> int:
    """Record ``scaling`` on every RotaryEmbedding of freshly built chunks (later ``set_rotary_base``
    calls keep using it) and switch their tables to it at ``theta``."""
    if not isinstance(scaling, RopeScaling):
        raise TypeError(f"scaling must be a RopeScaling, got {type(scaling).__name__}")
    for m in _rotary_modules(model_chunks):
        m.rope_scaling = scaling
    return set_rotary_base(model_chunks, theta)


def apply_rope_method(model_chunks, scaling: RopeScaling, theta: float) -> int:
    """Make already built chunks run ``scaling`` at ``theta`` (a checkpoint loaded for generation or
    evaluation): its frequencies (``set_rope_scaling``) and, for YaRN, the softmax scale of every core
    attention that keeps one (megatron's local attention and Instella's; Transformer Engine's takes it
    from the TransformerConfig at build time, ``plugin.transformer_config_overrides``)."""
    changed = set_rope_scaling(model_chunks, scaling, theta)
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for chunk in chunks:
        for m in chunk.modules():
            head_dim = getattr(m, "hidden_size_per_attention_head", None)
            if isinstance(getattr(m, "softmax_scale", None), float) and head_dim:
                scale = scaling.softmax_scale(head_dim)
                m.softmax_scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    return changed


def checkpoint_rope(checkpoint: str):
    """(theta or None, RopeScaling) a checkpoint recorded (plain base-law when it records no method)."""
    try:
        meta = read_meta(checkpoint)
    except (OSError, ValueError, CheckpointError):
        return None, RopeScaling()
    theta = meta.get(META_KEY)
    return (float(theta) if theta is not None else None), RopeScaling.from_meta(meta.get("rope_scaling"))


def current_rotary_base(model_chunks) -> Optional[float]:
    """The base last set by ``set_rotary_base`` (None if never set: the model's build-time base)."""
    bases = {getattr(m, "rotary_base", None) for m in _rotary_modules(model_chunks)}
    if len(bases) > 1:
        raise RuntimeError(f"RotaryEmbedding modules disagree on theta: {sorted(map(str, bases))}")
    return bases.pop() if bases else None


def starting_theta(checkpoint: Optional[str]) -> Optional[float]:
    """The RoPE theta a checkpoint was trained with (its ``rope_theta`` metadata), or None when there is
    no checkpoint, it cannot be read (``--load`` checks report that) or it records none. A recipe that
    names no ``rotary_base`` runs at this theta, so post-training keeps its starting model's base."""
    if not checkpoint:
        return None
    try:
        theta = read_meta(checkpoint).get(META_KEY)
    except (OSError, ValueError, CheckpointError):
        return None
    return float(theta) if theta is not None else None


def rope_meta(theta: float, iteration: int, schedule_description: Optional[str] = None) -> dict:
    """What the trainer stores in checkpoint metadata: the theta used for ``iteration`` (the last
    trained one), and the schedule. The HF export writes ``rope_theta`` into config.json."""
    meta = {META_KEY: float(theta), "rope_theta_iteration": int(iteration)}
    if schedule_description:
        meta["rope_schedule"] = schedule_description
    return meta


def theta_on_resume(meta: dict, schedule, next_iteration: int, override: bool = False) -> float:
    """The theta for ``next_iteration`` of a resumed run, after checking that ``schedule`` gives the
    checkpoint's theta at the iteration it was saved with (``check_resume_theta``)."""
    saved_it = meta.get("rope_theta_iteration", max(next_iteration - 1, 0))
    check_resume_theta(meta.get(META_KEY), schedule.theta_at(saved_it), override)
    return schedule.theta_at(next_iteration)


def check_resume_theta(saved: Optional[float], requested: float, override: bool = False,
                       rel_tol: float = 1e-9) -> float:
    """The theta to use when resuming from a checkpoint trained at ``saved``.

    ``requested`` is the schedule's theta at the resumed iteration. Equal (to ``rel_tol``) or no
    saved value (an old checkpoint): ``requested``. Different: refused with a ValueError unless
    ``override`` (``--override-rope-theta``, also what a new phase such as long-phase2 sets), in
    which case ``requested`` is used.
    """
    if saved is None or math.isclose(float(saved), float(requested), rel_tol=rel_tol):
        return float(requested)
    if override:
        return float(requested)
    raise ValueError(
        f"the checkpoint was trained with RoPE theta {float(saved):,.1f} but this run would use "
        f"{float(requested):,.1f} at the resumed iteration; changing theta on resume needs "
        "--override-rope-theta (or override_rope_theta: true in the recipe), otherwise keep the "
        "run's --rotary-base / --rope-schedule as it was")
