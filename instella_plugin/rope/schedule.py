"""RoPE theta schedules: which base is in force at each training iteration (``--rope-schedule``).

Forms (``RopeSchedule.parse``):
- ``constant:THETA``: one theta for the whole run.
- ``stepwise``: the recipe phase fixes theta (its ``rotary_base``); this is the official
  Instella-Long schedule, where theta changes only between phases (separate runs).
  ``stepwise:0=THETA0,STEP1=THETA1,...`` changes it within a run at the given iterations.
- ``geometric:THETA0:THETA1:START:END``: THETA0 up to iteration START, then geometric interpolation
  ``THETA0 * (THETA1/THETA0) ** ((it - START) / (END - START))``, THETA1 from END on.
With no spec the recipe's ``rotary_base`` is used (constant). Errors name the problem and the fix and
are raised at parse time, before any model is built. ``theta_at`` is a pure function of the
iteration, so a resumed run recomputes exactly the theta an uninterrupted run would use.
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

FORMS = ("constant:THETA", "stepwise", "stepwise:0=THETA0,STEP=THETA1,...", "geometric:THETA0:THETA1:START:END")


def _err(spec: str, problem: str) -> ValueError:
    return ValueError(f"bad --rope-schedule {spec!r}: {problem}. Forms: {', '.join(FORMS)}")


def _theta(spec: str, text) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise _err(spec, f"theta {text!r} is not a number")
    if not math.isfinite(value) or value <= 1.0:
        raise _err(spec, f"theta {text!r} must be a finite number > 1")
    return value


def _step(spec: str, text) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise _err(spec, f"step {text!r} is not an integer iteration")
    if value < 0:
        raise _err(spec, f"step {value} is negative")
    return value


@dataclass(frozen=True)
class RopeSchedule:
    """``kind`` is constant, stepwise or geometric; ``points`` are (iteration, theta) pairs:
    one for constant, the change points for stepwise, (START, THETA0) and (END, THETA1) for geometric."""
    kind: str
    points: Tuple[Tuple[int, float], ...]

    @classmethod
    def parse(cls, spec: Optional[str], recipe_theta: Optional[float] = None) -> "RopeSchedule":
        text = (spec or "").strip()
        if not text or text == "stepwise":
            if recipe_theta is None:
                raise _err(text, "the schedule takes theta from the recipe (rotary_base), and none was given; "
                                 "set rotary_base in the recipe or use constant:THETA")
            return cls("constant" if not text else "stepwise", ((0, _theta(text, recipe_theta)),))
        kind, _, rest = text.partition(":")
        if kind == "constant":
            return cls("constant", ((0, _theta(text, rest)),))
        if kind == "stepwise":
            points = []
            for item in rest.split(","):
                step, eq, theta = item.partition("=")
                if not eq:
                    raise _err(text, f"piece {item!r} is not STEP=THETA")
                points.append((_step(text, step), _theta(text, theta)))
            steps = [s for s, _ in points]
            if steps[0] != 0:
                raise _err(text, f"the first piece must start at step 0 (it starts at {steps[0]})")
            for a, b in zip(steps, steps[1:]):
                if b <= a:
                    raise _err(text, f"steps are out of order ({a} then {b}); list them in increasing order")
            return cls("stepwise", tuple(points))
        if kind == "geometric":
            parts = rest.split(":")
            if len(parts) != 4:
                raise _err(text, f"geometric takes 4 fields THETA0:THETA1:START:END, got {len(parts)}")
            t0, t1 = _theta(text, parts[0]), _theta(text, parts[1])
            start, end = _step(text, parts[2]), _step(text, parts[3])
            if end <= start:
                raise _err(text, f"steps are out of order: START {start} must be before END {end}")
            return cls("geometric", ((start, t0), (end, t1)))
        raise _err(text, f"unknown schedule kind {kind!r}")

    @classmethod
    def from_recipe(cls, recipe: dict, cli_spec: Optional[str] = None) -> "RopeSchedule":
        """The schedule of a recipe (``rope_schedule`` and ``rotary_base`` keys); a CLI spec wins."""
        spec = cli_spec if cli_spec is not None else recipe.get("rope_schedule")
        return cls.parse(spec, recipe.get("rotary_base"))

    def theta_at(self, iteration: int) -> float:
        """The theta in force at ``iteration`` (0-based count of completed optimizer steps)."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        if self.kind == "geometric":
            (start, t0), (end, t1) = self.points
            if iteration <= start:
                return t0
            if iteration >= end:
                return t1
            frac = (iteration - start) / (end - start)
            return math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0)))
        theta = self.points[0][1]
        for step, value in self.points:
            if iteration >= step:
                theta = value
        return theta

    @property
    def final_theta(self) -> float:
        """The theta at the end of the schedule (what an exported model should carry)."""
        return self.points[-1][1]

    def describe(self) -> str:
        if self.kind == "geometric":
            (start, t0), (end, t1) = self.points
            return f"geometric:{t0:g}:{t1:g}:{start}:{end}"
        if self.kind == "stepwise" and len(self.points) > 1:
            return "stepwise:" + ",".join(f"{s}={t:g}" for s, t in self.points)
        return f"{self.kind}:{self.points[0][1]:g}"
