"""One registry for every run-time patch the plugin makes to code it does not own (torch, megatron-core,
Megatron-LM). Used by the CPU mode (``cpu_mode``), the megatron-core fixes (``megatron_fixes``) and the
upstream Megatron-LM host (``upstream.registry``); it imports none of them (a leaf of the package).

A patch is data: a name, its target (a module and an attribute path in it), the package and version
it was written for, why it exists, optionally the parameter names the target must have, and a
function ``original -> replacement``. Applying one is

- **opt-in**: declaring patches changes nothing; ``PatchRegistry.apply`` replaces what is asked for;
- **idempotent**: a second apply is a no-op (the registry records what it applied, and every
  replacement is marked with the names it stands for, so another registry does not wrap it again);
- **anchored**: before anything is replaced, every target is imported and checked (present,
  callable, same parameter names); a missing target or a moved signature raises ``PatchError``
  naming the patch, the target, the version it was written for and the installed one, and leaves
  everything as it was;
- **conditional**: a patch may carry a condition; when false it is skipped.

``applied()`` lists every patch applied in this process (all registries, in order); each registry's
``describe()`` prints its patches with their reasons, so the documented list comes from this data.
"""
import functools
import importlib
import inspect
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

_MARK = "_instella_patch"  # on a replacement: the names of the patches it stands for
_APPLIED_IN_PROCESS: List["Patch"] = []


class PatchError(RuntimeError):
    """The code a patch was written for has changed: its target is missing or its signature moved."""


@dataclass(frozen=True)
class Patch:
    name: str
    module: str                # e.g. "megatron.core.optimizer.distrib_optimizer"
    attribute: str             # a path inside the module, e.g. "DistributedOptimizer.load_state_dict"
    make: Callable             # original -> replacement
    reason: str
    package: str               # whose code the target is: "megatron-core", "Megatron-LM", "torch"
    version: str               # the version of ``package`` the patch was written for
    owner: str = ""            # the registry that declares it
    phase: str = "default"
    signature: Optional[Tuple[str, ...]] = None  # the target's parameter names, when the patch relies on them
    condition: Optional[Callable[[], bool]] = None
    wraps: bool = True         # the replacement wraps the original (takes its name and docs, keeps __wrapped__)

    @property
    def target(self) -> str:
        return f"{self.module}.{self.attribute}"

    def describe(self) -> str:
        return f"{self.name}: {self.target} [{self.phase}] (written for {self.package} {self.version}) {self.reason}"


@dataclass(frozen=True)
class StandIn:
    """``make`` of a patch that replaces its target by a fixed object (compared by value, not identity)."""
    value: object

    def __call__(self, original):
        return self.value


class PatchRegistry:
    """Named patches of one owner (``cpu_mode``, ``megatron_fixes``, the upstream host) and what it applied."""

    def __init__(self, owner: str, *, package: str, version: str, phase: str = "default", hint: str = ""):
        self.owner, self.package, self.version, self.phase, self.hint = owner, package, version, phase, hint
        self._patches: Dict[str, Patch] = {}
        self._applied: Dict[str, Patch] = {}

    def add(self, patch: Patch) -> Patch:
        old = self._patches.get(patch.name)
        if old is not None and old.make != patch.make:
            raise ValueError(f"run-time patch {patch.name!r} is registered twice ({self.owner})")
        self._patches[patch.name] = patch
        return patch

    def register(self, name: str, module: str, attribute: str, *, reason: str, phase: Optional[str] = None,
                 condition: Optional[Callable[[], bool]] = None, signature: Optional[Tuple[str, ...]] = None,
                 package: Optional[str] = None, version: Optional[str] = None, wraps: bool = True):
        """Decorator: ``@register(...)`` on ``def make(original) -> replacement``."""
        def decorate(make):
            self.add(Patch(name, module, attribute, make, reason, package or self.package, version or self.version,
                           self.owner, phase or self.phase, signature, condition, wraps))
            return make
        return decorate

    def replace(self, name: str, module: str, attribute: str, value, **kwargs) -> None:
        """Declare a stand-in: the target becomes ``value`` (nothing of the original is kept)."""
        self.register(name, module, attribute, wraps=False, **kwargs)(StandIn(value))

    def registered(self, phase: Optional[str] = None) -> List[Patch]:
        return [p for p in self._patches.values() if phase is None or p.phase == phase]

    def applied(self) -> List[str]:
        return list(self._applied)

    def apply(self, names: Optional[List[str]] = None, phase: Optional[str] = None) -> List[str]:
        """Apply the named patches (or all, or all of ``phase``); return the names applied by this call.

        Already-applied patches and those whose condition is false are skipped. Every target is
        checked before anything is replaced, so a changed upstream changes nothing here.
        """
        unknown = set(names or ()) - set(self._patches)
        if unknown:
            raise ValueError(f"unknown run-time patches {sorted(unknown)}; known: {sorted(self._patches)}")
        todo = [p for p in self.registered(phase) if (names is None or p.name in names)
                and p.name not in self._applied and (p.condition is None or p.condition())]
        resolved = [(p, *self._resolve(p)) for p in todo]
        done = []
        for patch, parent, original in resolved:
            if patch.name not in getattr(original, _MARK, ()):  # else already in place (another registry)
                replacement = patch.make(original)
                if patch.wraps:
                    try:
                        functools.update_wrapper(replacement, original)
                    except (AttributeError, TypeError):
                        pass
                _mark(replacement, patch.name)
                setattr(parent, patch.attribute.rsplit(".", 1)[-1], replacement)
                _APPLIED_IN_PROCESS.append(patch)
                done.append(patch.name)
            self._applied[patch.name] = patch
        return done

    def check(self, phase: Optional[str] = None) -> None:
        """Check every target (whatever the conditions) without replacing anything; raise ``PatchError``."""
        for patch in self.registered(phase):
            self._resolve(patch)

    def describe(self, phase: Optional[str] = None) -> str:
        """One line per patch: name, target, phase, the version it was written for, reason."""
        return "\n".join(p.describe() for p in self.registered(phase))

    def _resolve(self, patch: Patch):
        try:
            parent = importlib.import_module(patch.module)
        except ImportError as e:
            raise self._error(patch, f"cannot be imported ({patch.module}: {e})") from e
        *path, leaf = patch.attribute.split(".")
        for part in path:
            parent = getattr(parent, part, None)
            if parent is None:
                raise self._error(patch, "is missing")
        original = getattr(parent, leaf, None)
        if not callable(original):
            raise self._error(patch, "is missing or not callable")
        if patch.signature is not None and patch.name not in getattr(original, _MARK, ()):
            found = _parameter_names(original)
            if found != tuple(patch.signature):
                raise self._error(patch, f"changed its signature: written for ({', '.join(patch.signature)}), "
                                         f"found ({', '.join(found) if found is not None else 'unreadable'})")
        return parent, original

    def _error(self, patch: Patch, problem: str) -> PatchError:
        return PatchError(f"run-time patch {patch.name!r} ({self.owner}): {patch.target} {problem}; the patch was "
                          f"written for {patch.package} {patch.version}, installed is "
                          f"{installed_version(patch.package)}" + (f" ({self.hint})" if self.hint else ""))


def _mark(replacement, name: str) -> None:
    try:
        setattr(replacement, _MARK, getattr(replacement, _MARK, frozenset()) | {name})
    except (AttributeError, TypeError):  # an object that takes no attributes: the registry's record still holds
        pass


def _parameter_names(fn) -> Optional[Tuple[str, ...]]:
    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def installed_version(package: str) -> str:
    """The version of ``package`` this process imports (megatron from its ``package_info``, which a
    Megatron-LM checkout carries too), for error messages."""
    try:
        if package in ("megatron-core", "Megatron-LM"):
            info = importlib.import_module("megatron.core.package_info")
            where = "" if package == "megatron-core" else f" at {sys.modules['megatron'].__path__[0]}"
            return f"megatron-core {info.__version__}{where}"
        return f"{package} {importlib.import_module(package).__version__}"
    except Exception as e:  # noqa: BLE001  (only for a message)
        return f"unknown ({type(e).__name__}: {e})"


def applied() -> List[Patch]:
    """Every patch applied in this process, by any registry, in the order applied."""
    return list(_APPLIED_IN_PROCESS)
