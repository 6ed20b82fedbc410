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
  mean) so that only one task vector is in memory at a time.
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
def _chunks(t: torch.Tensor):
    """Flat views of ``CHUNK`` elements of a contiguous tensor: element-wise work without full-size temporaries."""
    flat = t.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield flat[start:start + CHUNK]


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
        d = fp32(read(i)).sub_(base)
        if plan.method == "ties":
            thresholds[i] = trim_(d, plan.density[i], thresholds.get(i))
        elif plan.method == "dare":
            dare_(d, plan.density[i], gen, plan.rescale)
        if w != 1.0:
            d.mul_(w)
        yield i, d
        del d  # before the next input is read: one task vector in memory, not two


def task_vectors(plan: TensorPlan, name: str, read: Read, read_base: Callable[[], torch.Tensor]) -> torch.Tensor:
    """TIES or DARE (linear or TIES combination) of one tensor against the base; fp32."""
    base = fp32(read_base())  # never changed in place
    consensus = plan.method == "ties" or plan.combine == "ties"
    thresholds = {}
    if not consensus:  # one pass: base + lambda * sum w_i d_i [/ sum w_i]
        merged = torch.zeros_like(base)
        for _, d in _deltas(plan, name, read, base, thresholds):
            merged.add_(d)
            del d
        total = sum(plan.weights)
        if plan.normalize and abs(total) >= 1e-8:
            merged.div_(total)
    else:
        # pass 1: the elected sign of sum_i w_i d_i (>= 0 counts as +)
        divisor = torch.zeros_like(base)
        for _, d in _deltas(plan, name, read, base, thresholds):
            divisor.add_(d)
            del d
        # the divisor buffer carries the elected sign in its sign bit: +0.0 for +, -0.0 for - (then it
        # accumulates -w_i there), so no separate sign mask is held in pass 2
        for c in _chunks(divisor):
            c.copy_(torch.where(c >= 0, 0.0, -0.0))
        # pass 2: disjoint mean over the inputs whose sign agrees with the elected one
        merged = torch.zeros_like(base)
        for i, d in _deltas(plan, name, read, base, thresholds):
            for m, dv, x in zip(_chunks(merged), _chunks(divisor), _chunks(d)):
                negative = torch.signbit(dv)
                agree = torch.where(negative, x < 0, x > 0)
                m.add_(x * agree)
                dv.add_(torch.where(negative, -agree.float(), agree.float()), alpha=plan.weights[i])
            del d
        divisor.abs_()
        if plan.normalize:
            divisor[divisor == 0] = 1.0
            merged.div_(divisor)
        del divisor
    if plan.lam != 1.0:
        merged.mul_(plan.lam)
    return merged.add_(base)


def merge_tensor(plan: TensorPlan, name: str, read: Read,
                 read_base: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
    """One merged tensor in fp32 (the method's dispatcher)."""
    if plan.method == "linear":
        return linear(read, plan.weights)
    if plan.method == "slerp":
        a = read(0)
        return slerp(plan.t, a, read(1), inplace=True)
    if plan.method in ("ties", "dare"):
        if read_base is None:
            raise ValueError(f"{plan.method} needs a base checkpoint (--base)")
        return task_vectors(plan, name, read, read_base)
    raise ValueError(f"unknown merge method {plan.method!r}")
