"""A registry of run-time patches to Megatron-LM's ``megatron.training`` (Primus-style, opt-in, idempotent).

Each patch replaces one named attribute of one upstream module with a wrapper. A patch is:

- **opt-in**: nothing is applied on import; ``apply(names)`` applies the patches asked for, and only
  the upstream host (``pretrain_gpt.py --plugin NAME`` with the patch series of ``patches/``) asks;
- **idempotent**: applying twice changes nothing (the wrapper is marked, and the registry records
  what it applied in this process);
- **anchored**: before replacing, it checks that the attribute exists and is callable, so upstream
  drift fails loudly, naming the patch, the attribute and the tag the series was written for, instead
  of silently doing nothing;
- **conditional**: a patch may carry a condition (e.g. "CPU mode is on"); when false it is skipped.

Every patch is listed, with its reason, in ``patches/README.md``; ``describe()`` prints the same list
from the code (the two are checked against each other by ``tests/test_upstream_patches.py``).
"""
import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

EXPECTED_TAG = "core_v0.16.1"
_MARK = "_instella_patch"


class UpstreamDriftError(RuntimeError):
    """The upstream code no longer has what a patch was written against."""


@dataclass(frozen=True)
class RuntimePatch:
    name: str
    module: str          # e.g. "megatron.training.training"
    attribute: str       # e.g. "get_megatron_optimizer_config"
    make_wrapper: Callable  # original -> replacement
    reason: str
    phase: str = "startup"   # "startup": before pretrain(); "cpu": only with the CPU mode
    condition: Optional[Callable[[], bool]] = None

    @property
    def target(self) -> str:
        return f"{self.module}.{self.attribute}"


class PatchRegistry:
    """Named run-time patches and the record of which were applied in this process."""

    def __init__(self):
        self._patches: Dict[str, RuntimePatch] = {}
        self._applied: Dict[str, RuntimePatch] = {}

    def register(self, name: str, module: str, attribute: str, *, reason: str, phase: str = "startup",
                 condition: Optional[Callable[[], bool]] = None):
        """Decorator: ``@register(...)`` on ``def make_wrapper(original) -> replacement``."""
        def decorate(make_wrapper):
            old = self._patches.get(name)
            if old is not None and old.make_wrapper is not make_wrapper:
                raise ValueError(f"run-time patch {name!r} is registered twice")
            self._patches[name] = RuntimePatch(name, module, attribute, make_wrapper, reason, phase, condition)
            return make_wrapper
        return decorate

    def registered(self, phase: Optional[str] = None) -> List[RuntimePatch]:
        return [p for p in self._patches.values() if phase is None or p.phase == phase]

    def applied(self) -> List[str]:
        return list(self._applied)

    def apply(self, names: Optional[List[str]] = None, phase: Optional[str] = None) -> List[str]:
        """Apply the named patches (or all of ``phase``); return the names applied by this call.

        Already-applied patches and those whose condition is false are skipped. Every anchor is
        checked before anything is replaced, so a drifted upstream changes nothing.
        """
        unknown = set(names or ()) - set(self._patches)
        if unknown:
            raise ValueError(f"unknown run-time patches {sorted(unknown)}; known: {sorted(self._patches)}")
        todo = [p for p in self.registered(phase) if (names is None or p.name in names)
                and p.name not in self._applied and (p.condition is None or p.condition())]
        resolved = [(p, *_resolve(p)) for p in todo]
        done = []
        for patch, module, original in resolved:
            if getattr(original, _MARK, None) == patch.name:  # already in place (applied by another registry)
                self._applied[patch.name] = patch
                continue
            replacement = patch.make_wrapper(original)
            try:
                functools.update_wrapper(replacement, original)
            except (AttributeError, TypeError):
                pass
            setattr(replacement, _MARK, patch.name)
            setattr(module, patch.attribute, replacement)
            self._applied[patch.name] = patch
            done.append(patch.name)
        return done

    def describe(self) -> str:
        """One line per patch: name, target, phase, reason (the README's table, from the code)."""
        return "\n".join(f"{p.name}: {p.target} [{p.phase}] {p.reason}" for p in self._patches.values())


def _resolve(patch: RuntimePatch):
    try:
        module = importlib.import_module(patch.module)
    except ImportError as e:
        raise UpstreamDriftError(f"run-time patch {patch.name!r}: cannot import {patch.module} ({e}); "
                                 f"the patch series targets Megatron-LM {EXPECTED_TAG}") from e
    original = getattr(module, patch.attribute, None)
    if not callable(original):
        raise UpstreamDriftError(f"run-time patch {patch.name!r}: {patch.target} is missing or not callable; "
                                 f"the patch series targets Megatron-LM {EXPECTED_TAG} (check out that tag, "
                                 "or update instella_plugin/upstream for the new code)")
    return module, original


# The host's registry (``runtime`` and ``cpu`` register into it).
REGISTRY = PatchRegistry()
register_patch = REGISTRY.register
registered = REGISTRY.registered
applied = REGISTRY.applied
apply = REGISTRY.apply
describe = REGISTRY.describe
