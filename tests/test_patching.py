"""The run-time patch registry (``instella_plugin.patching``) and its three users.

For each user (the CPU mode, the megatron-core fixes, the upstream Megatron-LM host) a target is
moved (removed, or given other parameters) and applying must fail naming the target, the version the
patch was written for and the installed one, with nothing replaced. Applying twice is a no-op, also
across registries. The declared targets and signatures match the installed torch and megatron-core.
All in-process and quick: each user's registry is swapped for a fresh copy of its declarations, so a
patch applied elsewhere in this process does not hide the check.
"""
import inspect
import re
import sys
import types

import pytest
import torch

from instella_plugin import cpu_mode, megatron_fixes, patching
from instella_plugin.patching import PatchError, PatchRegistry
from instella_plugin.upstream import cpu as upstream_cpu  # noqa: F401  (registering)
from instella_plugin.upstream import registry as upstream_registry
from instella_plugin.upstream import runtime as upstream_runtime  # noqa: F401  (registering)
from instella_plugin.upstream.host import PluginHost

MCORE = "megatron-core 0.16.1"


def _fresh(registry: PatchRegistry) -> PatchRegistry:
    copy = PatchRegistry(registry.owner, package=registry.package, version=registry.version, phase=registry.phase,
                         hint=registry.hint)
    for patch in registry.registered():
        copy.add(patch)
    return copy


def _stub(*names):
    """A function whose signature has exactly these parameter names."""
    fn = lambda *a, **k: None  # noqa: E731
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    return fn


def test_apply_twice_is_a_no_op(monkeypatch):
    mod = types.ModuleType("fake_target_module")
    mod.Thing = type("Thing", (), {"method": lambda self, x: x})
    mod.helper = lambda: "original"
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    calls = []

    reg = PatchRegistry("test", package="megatron-core", version="0.16.1")

    @reg.register("wrap_method", mod.__name__, "Thing.method", signature=("self", "x"), reason="test")
    def _wrap(original):
        def method(self, x):
            calls.append(x)
            return 10 * original(self, x)
        return method

    reg.replace("stand_in", mod.__name__, "helper", _stub(), reason="test")
    original = mod.Thing.method
    before = len(patching.applied())
    assert reg.apply() == ["wrap_method", "stand_in"]
    wrapped, stand_in = mod.Thing.method, mod.helper
    assert mod.Thing().method(2) == 20 and calls == [2] and wrapped.__wrapped__ is original
    assert reg.apply() == [] and reg.apply(["wrap_method"]) == []  # twice: nothing changes
    assert mod.Thing.method is wrapped and mod.helper is stand_in and mod.Thing().method(3) == 30
    other = _fresh(reg)  # another registry with the same declarations sees the marks
    assert other.apply() == [] and other.applied() == ["wrap_method", "stand_in"]
    assert mod.Thing.method is wrapped and mod.helper is stand_in
    assert [p.name for p in patching.applied()[before:]] == ["wrap_method", "stand_in"]


def test_cpu_mode_fails_on_a_moved_target_and_changes_nothing(monkeypatch):
    from megatron.core.tensor_parallel import random as mrandom

    monkeypatch.setattr(cpu_mode, "PATCHES", _fresh(cpu_mode.PATCHES))
    monkeypatch.setattr(cpu_mode, "_ENABLED", False)
    current_device, modes = torch.cuda.current_device, torch.overrides._get_current_function_mode_stack()
    monkeypatch.delattr(mrandom, "_get_cuda_rng_state")  # megatron-core renamed it
    with pytest.raises(PatchError, match=r"'megatron_get_cuda_rng_state' \(cpu_mode\): megatron\.core\."
                                         r"tensor_parallel\.random\._get_cuda_rng_state is missing.*written for "
                                         rf"{MCORE}, installed is {MCORE}"):
        cpu_mode.enable(force=True)
    monkeypatch.undo()
    monkeypatch.setattr(cpu_mode, "PATCHES", _fresh(cpu_mode.PATCHES))
    monkeypatch.setattr(cpu_mode, "_ENABLED", False)
    monkeypatch.setattr(torch.distributed, "barrier", _stub("group", "async_op"))  # torch moved its parameters
    installed = re.escape(torch.__version__)
    with pytest.raises(PatchError, match=r"torch\.distributed\.barrier changed its signature: written for "
                                         r"\(group, async_op, device_ids, timeout\), found \(group, async_op\).*"
                                         rf"written for torch 2\.13\.0, installed is torch {installed}"):
        cpu_mode.enable(force=True)
    assert torch.cuda.current_device is current_device and not cpu_mode.is_enabled()
    assert torch.overrides._get_current_function_mode_stack() == modes and cpu_mode.PATCHES.applied() == []


def test_megatron_fix_fails_on_a_moved_signature(monkeypatch):
    from megatron.core.optimizer import distrib_optimizer

    monkeypatch.setattr(megatron_fixes, "FIXES", _fresh(megatron_fixes.FIXES))
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", False)  # the fix's condition
    moved = _stub("self", "model_param", "tensors", "strict")
    monkeypatch.setattr(distrib_optimizer.DistributedOptimizer, "_set_main_param_and_optimizer_states", moved)
    with pytest.raises(PatchError, match=r"'dist_opt_step' \(megatron_fixes\): megatron\.core\.optimizer\."
                                         r"distrib_optimizer\.DistributedOptimizer\._set_main_param_and_optimizer_"
                                         r"states changed its signature: written for \(self, model_param, tensors\),"
                                         rf" found \(self, model_param, tensors, strict\).*written for {MCORE}"):
        megatron_fixes.fix_distributed_optimizer_step_on_load()
    assert distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states is moved
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)  # condition false: skipped, not checked
    assert megatron_fixes.fix_distributed_optimizer_step_on_load() is False

    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", False)  # the signature it was written for: applied once
    monkeypatch.setattr(distrib_optimizer.DistributedOptimizer, "_set_main_param_and_optimizer_states",
                        _stub("self", "model_param", "tensors"))
    assert megatron_fixes.fix_distributed_optimizer_step_on_load() is True
    fixed = distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states
    assert megatron_fixes.fix_distributed_optimizer_step_on_load() is False and megatron_fixes.apply_all() == []
    assert distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states is fixed


def test_upstream_host_fails_on_a_moved_target_naming_the_tag(monkeypatch):
    """Megatron-LM's modules stand in as fakes with the tag's signatures, but ``training_log`` moved."""
    fresh = _fresh(upstream_registry.REGISTRY)
    monkeypatch.setattr(upstream_registry, "apply", fresh.apply)
    monkeypatch.setitem(sys.modules, "megatron.training", types.ModuleType("megatron.training"))
    for patch in fresh.registered("startup"):
        if patch.module.startswith("megatron.training."):
            mod = sys.modules.get(patch.module) or types.ModuleType(patch.module)
            setattr(mod, patch.attribute, _stub(*upstream_registry.SIGNATURES[patch.target]))
            monkeypatch.setitem(sys.modules, patch.module, mod)
    training = sys.modules["megatron.training.training"]
    moved = _stub(*[n for n in upstream_registry.SIGNATURES[f"{training.__name__}.training_log"] if n != "grad_norm"])
    training.training_log = moved
    from megatron.core.datasets import utils as dataset_utils
    compile_helpers = dataset_utils.compile_helpers

    host = PluginHost.__new__(PluginHost)  # no __init__: it would load the plugin and maybe the CPU mode
    host.cpu = False
    with pytest.raises(PatchError, match=r"'plugin_train_log' \(upstream host\): megatron\.training\.training\."
                                         r"training_log changed its signature.*found \(.*max_attention_logit.*\);"
                                         r" the patch was written for Megatron-LM core_v0\.16\.1, installed is "
                                         r"megatron-core 0\.16\.1 at .*check out that tag"):
        host.hooks(datasets=None, builder=None, forward_step=None, extra_args_provider=None)
    assert training.training_log is moved and dataset_utils.compile_helpers is compile_helpers
    assert fresh.applied() == []


def test_declared_targets_match_the_installed_torch_and_megatron_core():
    """Every CPU-mode and megatron-core patch finds its target with the declared parameters here."""
    for registry in (cpu_mode.PATCHES, megatron_fixes.FIXES):
        registry.check()
        for patch in registry.registered():
            assert patch.reason and patch.version and patch.target in registry.describe()
    assert {p.package for p in cpu_mode.PATCHES.registered()} == {"torch", "megatron-core"}
    described = cpu_mode.describe()
    assert all(p.name in described for p in cpu_mode.PATCHES.registered()) and "function mode" in described
