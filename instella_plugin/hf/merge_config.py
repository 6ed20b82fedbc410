"""What a merge is, as data: the method, its inputs and parameters, checked before any tensor is read.

A ``MergeSpec`` comes from command-line flags or from a YAML file in mergekit's shape::

    merge_method: ties            # uniform | weighted | layerwise | slerp | ties | dare | greedy-soup
    base_model: runs/stage1       # ties and dare: the task vectors are taken against it
    models:
      - model: runs/seed_5796
        parameters: {weight: 1.0, density: 0.5}
      - model: runs/seed_6198
    parameters: {density: 0.5, lambda: 1.0, normalize: true, seed: 0}
    dtype: bfloat16

mergekit's names ``linear``, ``dare_linear`` and ``dare_ties`` are accepted (weighted; dare with
``combine: linear`` or ``ties``). A weight or SLERP's ``t`` may be a list: a per-layer schedule whose
values are spread evenly over the layers and interpolated linearly between them (mergekit's
"gradient"; a list of num_layers values gives each layer its own). Layer ``i`` of ``L`` sits at
``i / (L - 1)``; the embedding at 0, the final norm and output layer at 1 (mergekit puts every
non-layer tensor at 0).

``check()`` refuses, naming the flag and the fix: a parameter out of range (density not in (0, 1], t not
in [0, 1], weights negative or summing to zero at some layer), a parameter the method does not use, a
task-vector method without a base, SLERP with other than two inputs.
"""
import math
import re
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Union

import yaml

from instella_plugin.hf.merge_methods import TensorPlan

METHODS = ("uniform", "weighted", "layerwise", "slerp", "ties", "dare", "greedy-soup")
ALIASES = {"linear": ("weighted", {}), "dare_linear": ("dare", {"combine": "linear"}),
           "dare_ties": ("dare", {"combine": "ties"}), "greedy_soup": ("greedy-soup", {}),
           "layer-wise": ("layerwise", {})}
TASK_VECTOR = ("ties", "dare")
Schedule = Union[float, List[float]]
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class MergeConfigError(ValueError):
    """A merge specification that cannot be run; raised before any tensor is read."""


@dataclass(frozen=True)
class MergeSpec:
    method: str
    inputs: Sequence[str]
    base: Optional[str] = None
    weights: Optional[Sequence[Schedule]] = None      # one per input
    t: Schedule = 0.5                                  # slerp
    density: Optional[Sequence[float]] = None          # ties / dare, one per input
    lam: float = 1.0
    normalize: bool = True
    combine: str = "linear"                            # dare
    rescale: str = "inverse"                           # dare
    seed: int = 0                                      # dare
    dtype: Optional[str] = None
    given: frozenset = field(default=frozenset(), compare=False)  # parameters set explicitly

    @property
    def n(self) -> int:
        return len(self.inputs)

    def resolved_weights(self) -> List[Schedule]:
        return list(self.weights) if self.weights is not None else [1.0] * self.n

    def check(self) -> "MergeSpec":
        bad = lambda msg: MergeConfigError(f"--method {self.method}: {msg}")  # noqa: E731
        if self.method not in METHODS:
            raise MergeConfigError(f"unknown merge method {self.method!r}; choose from {', '.join(METHODS)} "
                                   f"(or mergekit's {', '.join(ALIASES)})")
        if self.n < 2:
            raise MergeConfigError(f"merging needs at least two checkpoints, got {self.n}")
        unused = {"uniform": {"weights", "t", "density", "base", "lambda", "seed", "combine", "rescale"},
                  "weighted": {"t", "density", "base", "lambda", "seed", "combine", "rescale"},
                  "layerwise": {"t", "density", "base", "lambda", "seed", "combine", "rescale"},
                  "greedy-soup": {"weights", "t", "density", "base", "lambda", "seed", "combine", "rescale"},
                  "slerp": {"weights", "density", "base", "lambda", "seed", "combine", "rescale"},
                  "ties": {"t", "seed", "combine", "rescale"}, "dare": {"t"}}[self.method]
        stray = sorted(unused & self.given)
        if stray:
            hint = " (uniform takes none: use --method weighted for weights)" if self.method == "uniform" else ""
            raise bad(f"does not use {', '.join(stray)}; remove {'it' if len(stray) == 1 else 'them'}{hint}")
        if self.weights is not None:
            if len(self.weights) != self.n:
                raise bad(f"{len(self.weights)} weights for {self.n} checkpoints; give one weight per input")
            for w in self.weights:
                for v in (w if isinstance(w, list) else [w]):
                    if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                        raise bad(f"weights {list(self.weights)} must be finite and non-negative")
                if isinstance(w, list) and not w:
                    raise bad("an empty per-layer weight list; give at least one value")
            if self.method == "layerwise" and not any(isinstance(w, list) for w in self.weights):
                raise bad("needs at least one per-layer weight list (e.g. --weights 1,0 0,1); plain weights "
                          "are --method weighted")
            if self.method == "weighted" and any(isinstance(w, list) for w in self.weights):
                raise bad("per-layer weight lists belong to --method layerwise")
            for pos in self._positions():
                if sum(_at(w, pos) for w in self.weights) <= 0:
                    where = "" if not any(isinstance(w, list) for w in self.weights) else f" at layer position {pos:g}"
                    raise bad(f"weights {list(self.weights)} sum to zero{where}; they must sum to a positive value")
        elif self.method in ("weighted", "layerwise"):
            raise bad("needs --weights (one per input)")
        if self.method == "slerp":
            if self.n != 2:
                raise bad(f"interpolates exactly two checkpoints, got {self.n}")
            for v in (self.t if isinstance(self.t, list) else [self.t]):
                if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                    raise bad(f"t = {self.t} must lie in [0, 1] (0 is the first input, 1 the second)")
        if self.method in TASK_VECTOR:
            if not self.base:
                raise bad("takes task vectors against a base checkpoint; give --base (for Instella's seeds: "
                          "the stage-1 checkpoint they started from)")
            if self.density is None or len(self.density) != self.n:
                got = "none" if self.density is None else len(self.density)
                raise bad(f"needs one --density per input or one for all, got {got}")
            for d in self.density:
                if not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
                    raise bad(f"density {d} is out of range; it is the fraction of each task vector kept, in (0, 1]")
            if not math.isfinite(self.lam):
                raise bad(f"lambda {self.lam} must be finite")
            if self.combine not in ("linear", "ties"):
                raise bad(f"combine {self.combine!r}: choose linear or ties")
            if self.rescale not in ("inverse", "l1", "none"):
                raise bad(f"rescale {self.rescale!r}: choose inverse, l1 or none")
        elif self.base:
            raise bad("takes no base checkpoint (--base is for ties and dare)")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise bad(f"dtype {self.dtype!r}: choose float32, bfloat16 or float16")
        return self

    def _positions(self) -> List[float]:
        lens = [len(w) for w in (self.weights or []) if isinstance(w, list)]
        if isinstance(self.t, list):
            lens.append(len(self.t))
        steps = max([1] + [n - 1 for n in lens])
        return sorted({0.0, 1.0} | {i / steps for i in range(steps + 1)})

    def plan(self, name: str, num_layers: int) -> TensorPlan:
        """The parameters for one tensor (``name``: a Megatron or HF tensor name)."""
        pos = position(name, num_layers)
        method = {"uniform": "linear", "weighted": "linear", "layerwise": "linear", "greedy-soup": "linear"}.get(
            self.method, self.method)
        return TensorPlan(method=method, weights=[_at(w, pos) for w in self.resolved_weights()],
                          t=_at(self.t, pos), density=tuple(self.density or ()), lam=self.lam,
                          normalize=self.normalize, combine=self.combine, rescale=self.rescale, seed=self.seed)

    def record(self) -> dict:
        """The parameters as written into the merge record."""
        out = {"method": self.method, "weights": self.resolved_weights()}
        if self.method == "slerp":
            out["t"] = self.t
        if self.method in TASK_VECTOR:
            out.update({"base": self.base, "density": list(self.density), "lambda": self.lam,
                        "normalize": self.normalize})
        if self.method == "dare":
            out.update({"combine": self.combine, "rescale": self.rescale, "seed": self.seed})
        return out


def position(name: str, num_layers: int) -> float:
    """Where a tensor sits along the depth, in [0, 1]: the embedding 0, layer i i/(L-1), the head 1."""
    m = _LAYER.search(name)
    if m:
        return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0
    return 0.0 if "embed" in name else 1.0


def _at(schedule: Schedule, pos: float) -> float:
    """A scalar, or a list of values spread over [0, 1] and interpolated linearly (mergekit's gradient)."""
    if not isinstance(schedule, list):
        return float(schedule)
    if len(schedule) == 1:
        return float(schedule[0])
    scaled = pos * (len(schedule) - 1)
    i0 = int(scaled)
    i1 = min(len(schedule) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * float(schedule[i0]) + frac * float(schedule[i1])


def build_spec(method: Optional[str], inputs: Sequence[str], *, weights=None, base=None, t=None, density=None,
               lam=None, normalize=None, combine=None, rescale=None, seed=None, dtype=None) -> MergeSpec:
    """A checked spec from flag values (None: not given). One density stands for every input."""
    method = method or ("weighted" if weights is not None else "uniform")
    method, implied = ALIASES.get(method, (method, {}))
    given = {k for k, v in dict(weights=weights, base=base, t=t, density=density, combine=combine,
                                 rescale=rescale, seed=seed).items() if v is not None}
    if lam is not None:
        given.add("lambda")
    if density is not None and not isinstance(density, (list, tuple)):
        density = [density]
    if density is not None and len(density) == 1:
        density = list(density) * len(inputs)
    kwargs = {k: v for k, v in dict(t=t, lam=lam, normalize=normalize, rescale=rescale, seed=seed).items()
              if v is not None}
    combine = combine or implied.get("combine", "linear")
    spec = MergeSpec(method=method, inputs=list(inputs), base=base, dtype=dtype, combine=combine,
                     weights=None if weights is None else list(weights),
                     density=None if density is None else list(density), given=frozenset(given), **kwargs)
    return spec.check()


def parse_schedule(text: str) -> Schedule:
    """``0.5`` or ``1,0.5,0`` (a per-layer schedule) from the command line."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MergeConfigError(f"{text!r} is not a number or a comma-separated list of numbers") from None
    if not values:
        raise MergeConfigError(f"{text!r} holds no number")
    return values if "," in text else values[0]


def load_spec(path: str, overrides: Optional[Dict] = None) -> MergeSpec:
    """A checked spec from a mergekit-style YAML file (``overrides``: values from flags, applied on top)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise MergeConfigError(f"cannot read merge config {path}: {e}") from None
    if not isinstance(data, dict) or "merge_method" not in data or "models" not in data:
        raise MergeConfigError(f"{path}: a merge config is a mapping with merge_method and models "
                               "(see docs/merge.md)")
    known = {"merge_method", "base_model", "models", "parameters", "dtype"}
    stray = sorted(set(data) - known)
    if stray:
        raise MergeConfigError(f"{path}: unknown keys {stray}; known: {sorted(known)}")
    shared = dict(data.get("parameters") or {})
    models = data["models"]
    if not isinstance(models, list) or not all(isinstance(m, dict) and "model" in m for m in models):
        raise MergeConfigError(f"{path}: models is a list of {{model: PATH, parameters: {{...}}}}")
    per = [dict(m.get("parameters") or {}) for m in models]
    for p in per:
        stray = sorted(set(p) - {"weight", "density"})
        if stray:
            raise MergeConfigError(f"{path}: per-model parameters are weight and density, not {stray}")
    stray = sorted(set(shared) - {"weight", "density", "t", "lambda", "normalize", "combine", "rescale", "seed"})
    if stray:
        raise MergeConfigError(f"{path}: unknown parameters {stray}")

    def each(key):
        if not any(key in p for p in per) and key not in shared:
            return None
        return [p.get(key, shared.get(key, 1.0)) for p in per]

    spec = build_spec(data["merge_method"], [str(m["model"]) for m in models], weights=each("weight"),
                      base=data.get("base_model"), t=shared.get("t"), density=each("density"),
                      lam=shared.get("lambda"), normalize=shared.get("normalize"), combine=shared.get("combine"),
                      rescale=shared.get("rescale"), seed=shared.get("seed"), dtype=data.get("dtype"))
    return replace(spec, **(overrides or {})).check() if overrides else spec
