"""Merge methods for one tensor at a time: linear (uniform, weighted, layer-wise), SLERP, TIES, DARE.

Every method sees one tensor of every input through ``read(i)`` (a fresh tensor of input ``i``, any
dtype) and, for task-vector methods, ``read_base()``; it returns the merged tensor in fp32. Inputs are
read one at a time where the method allows it, so memory is a few copies of one tensor whatever the
number of inputs:

- linear: ``sum_i w_i x_i / sum_i w_i`` accumulated input by input (Wortsman et al. 2022, model soups).
- SLERP (two inputs): spherical interpolation of the flattened tensors from ``x_0`` (t=0) to ``x_1``
  (t=1); when the normalised vectors are nearly colinear (``|cos| > dot_threshold``) or a norm is
  below ``eps`` (counted as 1), the linear ``(1-t) x_0 + t x_1``. The same definition as mergekit's.
- TIES (Yadav et al. 2023), against a base: task vectors ``d_i = x_i - base``; trim each to its
  ``density`` fraction of largest magnitudes (``k = max(1, int(density * numel))``; every element tied
  with the k-th magnitude is kept); weight ``w_i``; elect the sign of ``sum_i w_i trim(d_i)`` per element
  (zero counts as +); disjoint mean: ``sum_i w_i trim(d_i) [agrees] / sum_i w_i [agrees]`` (``normalize``;
  0 where no input agrees); result ``base + lambda * merged``. Two passes over the inputs (sign, then
  mean) so that only one task vector is in memory at a time; between them the elected sign and each
  input's agreement are bits (``(n + 1) / 8`` bytes per element), not fp32 buffers.
- DARE (Yu et al. 2023): drop each element of ``d_i`` with probability ``1 - density`` (Bernoulli masks
  from a generator seeded by (seed, tensor name), drawn in input order, so a merge is reproducible),
  rescale the survivors (``inverse``: by ``1 / density`` as in the paper; ``l1``: to the L1 norm of
  ``d_i`` as mergekit does; ``none``), then combine linearly (``base + lambda * sum w_i d'_i [/ sum w_i]``)
  or with TIES' sign election and disjoint mean.

Nothing here reads files or checks configurations (``merge_config`` does that before any tensor is read).
"""
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from instella_plugin.hf.megatron_io import add_scaled_

Read = Callable[[int], torch.Tensor]
SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
L1_EPS = 1e-7
CHUNK = 1 << 20  # elements per step of the element-wise passes (4 MB in fp32)


@dataclass(frozen=True)
class TensorPlan:
    """The resolved parameters of one method for one tensor (per-layer schedules already applied)."""
    method: str                      # linear | slerp | ties | dare
    weights: Sequence[float] = ()    # one per input
    t: float = 0.5                   # slerp
    density: Sequence[float] = ()    # ties / dare, one per input
    lam: float = 1.0                 # task-vector scale
    normalize: bool = True           # task vectors: divide by the (agreeing) weight sum
    combine: str = "linear"          # dare: linear | ties
    rescale: str = "inverse"         # dare: inverse | l1 | none
    seed: int = 0                    # dare


def fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32: itself when it already is (readers return fresh tensors, which may be changed in place)."""
    if not x.is_floating_point():
        raise ValueError("a non-floating-point tensor cannot be merged")
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def releasable(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a copy of it when its storage cannot be freed early. A checkpoint reader's tensor may live
    in a fixed-size storage (``torch.load``'s); a merged tensor built in one could not be released by the
    Megatron writer once written (``write_dist_checkpoint`` resizes it to zero), so it would stay in memory
    while the next tensor is merged. The copy is made while no other input of the tensor is held."""
    return x if x.untyped_storage().resizable() else x.clone()


def tensor_seed(seed: int, name: str) -> int:
    """The seed of one tensor's DARE masks: independent of the order tensors are merged in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


# ---- linear ---------------------------------------------------------------------------------------
def linear(read: Read, weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i x_i / sum_i w_i`` in fp32, one input in memory at a time."""
    acc = None
    for i, w in enumerate(weights):
        if w == 0:
            continue  # a layer-wise schedule can leave an input out of a layer: not read at all
        x = read(i)
        if not x.is_floating_point():
            raise ValueError("a non-floating-point tensor cannot be averaged")
        if acc is None:
            acc = fp32(x)
            if w != 1.0:
                acc.mul_(w)
        else:
            add_scaled_(acc, x, w)
        del x
    return acc.div_(sum(weights))


# ---- SLERP ----------------------------------------------------------------------------------------
def slerp(t: float, a: torch.Tensor, b: torch.Tensor, dot_threshold: float = SLERP_DOT_THRESHOLD,
          eps: float = SLERP_EPS, inplace: bool = False) -> torch.Tensor:
    """Spherical interpolation of two tensors (flattened), linear when nearly colinear; fp32.

    ``inplace``: ``a`` is a fresh tensor the result may be built in (when it is fp32)."""
    a, b = fp32(a), fp32(b)
    if a.numel() == 0:
        return a.clone()
    na, nb = torch.linalg.vector_norm(a).item(), torch.linalg.vector_norm(b).item()
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = max(-1.0, min(1.0, torch.dot(a.reshape(-1), b.reshape(-1)).item() / (na * nb)))
    if abs(dot) > dot_threshold:
        ca, cb = 1.0 - t, t
    else:
        theta = math.acos(dot)
        ca, cb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    out = a.mul_(ca) if inplace else a * ca
    return out.add_(b, alpha=cb)


# ---- task vectors ---------------------------------------------------------------------------------
def _spans(numel: int):
    """(start, stop) of the ``CHUNK``-element steps over ``numel`` elements."""
    for start in range(0, numel, CHUNK):
        yield start, min(start + CHUNK, numel)


def _chunks(t: torch.Tensor):
    """Flat views of ``CHUNK`` elements of a contiguous tensor: element-wise work without full-size temporaries."""
    flat = t.view(-1)
    for start, stop in _spans(flat.numel()):
        yield flat[start:stop]


def kth_largest_abs(x: torch.Tensor, k: int) -> float:
    """The k-th largest ``|x|``, exactly, in two counting passes (a radix select on the fp32 bit pattern,
    which orders non-negative floats like their values); memory: one chunk, not a sorted copy."""
    prefix, need = 0, k
    for shift in (16, 0):
        counts = torch.zeros(1 << 16, dtype=torch.int64)
        for c in _chunks(x):
            bits = c.abs().view(torch.int32)
            if shift == 0:
                bits = bits[(bits >> 16) == (prefix >> 16)]
            counts += torch.bincount((bits >> shift) & 0xFFFF, minlength=1 << 16)
        from_top = counts.flip(0).cumsum(0)  # elements in the buckets at or above each one, largest first
        idx = int(torch.searchsorted(from_top, torch.tensor([need])).item())
        need -= int(from_top[idx - 1]) if idx else 0
        prefix |= ((1 << 16) - 1 - idx) << shift
    return torch.tensor([prefix], dtype=torch.int32).view(torch.float32).item()


def trim_(delta: torch.Tensor, density: float, thr: Optional[float] = None) -> Optional[float]:
    """Zero, in place, every element below the k-th largest magnitude (``k = max(1, int(density numel))``).
    Elements tied with the k-th are all kept. Returns the threshold (``thr``: one found before)."""
    if density >= 1:
        return None
    if thr is None:
        thr = kth_largest_abs(delta, max(1, int(density * delta.numel())))
    for c in _chunks(delta):
        c.masked_fill_(c.abs() < thr, 0.0)
    return thr


def dare_(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: str) -> torch.Tensor:
    """Drop each element with probability ``1 - density`` (in place) and rescale the survivors.

    The Bernoulli draws come chunk by chunk from ``generator``: the same stream as one draw over the
    whole tensor (torch draws CPU Bernoulli samples in order), without a full-size mask."""
    if density >= 1:
        return delta
    before = after = 0.0
    for c in _chunks(delta):
        if rescale == "l1":
            before += c.abs().sum().item()
        c.mul_(torch.bernoulli(torch.full(c.shape, density, dtype=torch.float32), generator=generator))
        if rescale == "l1":
            after += c.abs().sum().item()
    if rescale == "inverse":
        delta.div_(density)
    elif rescale == "l1":
        if before >= L1_EPS and after >= L1_EPS:
            delta.mul_(before / after)
    elif rescale != "none":
        raise ValueError(f"unknown DARE rescale {rescale!r}; choose inverse, l1 or none")
    return delta


def _deltas(plan: TensorPlan, name: str, read: Read, base: torch.Tensor, thresholds: dict):
    """Yield (i, w_i * sparsified task vector of input i) in input order; same values on every call
    (``thresholds``: TIES' trim thresholds, found on the first pass and reused on the second)."""
    gen = torch.Generator().manual_seed(tensor_seed(plan.seed, name)) if plan.method == "dare" else None
    for i, w in enumerate(plan.weights):
        d = fp32(read(i))
        if base.dtype == torch.float32:
            d.sub_(base)
        else:  # a base kept in its own dtype: subtracted block by block (no full-size fp32 copy)
            add_scaled_(d, base, -1.0)
        if plan.method == "ties":
            thresholds[i] = trim_(d, plan.density[i], thresholds.get(i))
        elif plan.method == "dare":
            dare_(d, plan.density[i], gen, plan.rescale)
        if w != 1.0:
            d.mul_(w)
        yield i, d
        del d  # before the next input is read: one task vector in memory, not two


def task_vectors(plan: TensorPlan, name: str, read: Read, read_base: Callable[[], torch.Tensor]) -> torch.Tensor:
    """TIES or DARE (linear or TIES combination) of one tensor against the base; fp32.

    Memory, in fp32 copies of the tensor: the base (in its stored dtype), the running sum and one task
    vector: 3 (with a base of half the width: 2.5); TIES' consensus adds (n + 1) / 8 bytes per element
    for n inputs (one bit per input and one for the elected sign), a quarter copy for up to 7 inputs."""
    base = read_base()  # kept in its dtype and never changed in place
    if not base.is_floating_point():
        raise ValueError("a non-floating-point base tensor cannot be merged")
    consensus = plan.method == "ties" or plan.combine == "ties"
    thresholds = {}
    merged = torch.zeros(base.shape, dtype=torch.float32)
    for _, d in _deltas(plan, name, read, base, thresholds):  # pass 1: sum_i w_i d_i
        merged.add_(d)
        del d
    if not consensus:  # base + lambda * sum w_i d_i [/ sum w_i]
        total = sum(plan.weights)
        if plan.normalize and abs(total) >= 1e-8:
            merged.div_(total)
    else:
        bits = _elect(merged, len(plan.weights))
        merged.zero_()
        for i, d in _deltas(plan, name, read, base, thresholds):  # pass 2: the inputs that agree
            _add_agreeing(merged, bits, len(plan.weights), i, d)
            del d
        if plan.normalize:
            _divide_by_agreeing_weights(merged, bits, plan.weights)
        del bits
    if plan.lam != 1.0:
        merged.mul_(plan.lam)
    if base.dtype == torch.float32:
        return merged.add_(base)
    add_scaled_(merged, base, 1.0)
    return merged


# TIES' consensus state, one bit per element per plane: bit i % 8 of plane i // 8 says input i agrees with
# the elected sign; bit n % 8 of plane n // 8 says the elected sign is negative (n inputs).
def _elect(total: torch.Tensor, n: int) -> torch.Tensor:
    """The bit planes holding the elected sign of ``total`` (negative unless ``>= 0``: zero counts as +)."""
    bits = torch.zeros(n // 8 + 1, total.numel(), dtype=torch.uint8)
    plane, shift = divmod(n, 8)
    for (start, stop), t in zip(_spans(total.numel()), _chunks(total)):
        bits[plane, start:stop] = (~(t >= 0)).to(torch.uint8) << shift
    return bits


def _add_agreeing(merged: torch.Tensor, bits: torch.Tensor, n: int, i: int, d: torch.Tensor) -> None:
    """``merged += d`` where the sign of ``d`` is the elected one (strictly), recording input i's agreement."""
    sign_plane, sign_shift = divmod(n, 8)
    plane, shift = divmod(i, 8)
    for (start, stop), m, x in zip(_spans(merged.numel()), _chunks(merged), _chunks(d)):
        negative = (bits[sign_plane, start:stop] >> sign_shift).bool()
        agree = torch.where(negative, x < 0, x > 0)
        m.add_(x * agree)
        bits[plane, start:stop] |= agree.to(torch.uint8) << shift


def _divide_by_agreeing_weights(merged: torch.Tensor, bits: torch.Tensor, weights: Sequence[float]) -> None:
    """``merged /= |sum_i w_i [input i agrees]|`` (1 where that is 0), the sum taken in input order in fp32."""
    for (start, stop), m in zip(_spans(merged.numel()), _chunks(merged)):
        divisor = torch.zeros(stop - start, dtype=torch.float32)
        for i, w in enumerate(weights):
            divisor.add_(((bits[i // 8, start:stop] >> (i % 8)) & 1).float(), alpha=w)
        divisor.abs_()
        divisor.masked_fill_(divisor == 0, 1.0)
        m.div_(divisor)


def merge_tensor(plan: TensorPlan, name: str, read: Read,
                 read_base: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
    """One merged tensor in fp32 (the method's dispatcher)."""
    if plan.method == "linear":
        return linear(read, plan.weights)
    if plan.method == "slerp":
        a = releasable(fp32(read(0)))  # the result is built in it
        return slerp(plan.t, a, read(1), inplace=True)
    if plan.method in ("ties", "dare"):
        if read_base is None:
            raise ValueError(f"{plan.method} needs a base checkpoint (--base)")
        return task_vectors(plan, name, read, read_base)
    raise ValueError(f"unknown merge method {plan.method!r}")
