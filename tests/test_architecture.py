"""The package's import graph: every arrow points down the layers, and no module imports itself back.

Each module of ``instella_plugin`` belongs to a component (its first name under the package:
``hf``, ``training``, ``checkpoint_layout``...). Components sit in layers; a module may import its
own component and any component of a lower layer, and a component of its own layer only by an
arrow listed in ``SIDEWAYS`` with its reason::

    6  edge       cli, demo                                   command lines that start everything
    5  plugin     the Instella plugin: composes recipes, objectives and evaluation
    4  uses       evaluation, rl, synth                      what is built on generation
    3  tools      hf, upstream, launch, testing, inference    each apart from the others
    2  training   the trainer
    1  leaves     model, data, rope, kernels                  sideways only by SIDEWAYS
    0  base       the package root, checkpoint_layout, checkpoint_check, patching, flag_types, cpu_mode,
                  megatron_fixes, megatron_import: small modules used everywhere

Every import of ``instella_plugin...`` counts: module level, inside functions, and a string naming a
module (``importlib.import_module`` in ``cli.py``). Cycles count every arrow that runs at import or
call time (not ``if TYPE_CHECKING:`` imports, not strings). Package imports belong at module top;
only CLI-edge modules whose imports pull in heavy third-party code (``LAZY_AT_EDGE``) defer them.
"""
import ast
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "instella_plugin")
PACKAGE = "instella_plugin"

LAYERS = {
    "": 0, "checkpoint_layout": 0, "checkpoint_check": 0, "patching": 0, "flag_types": 0, "cpu_mode": 0,
    "megatron_fixes": 0, "megatron_import": 0,
    "model": 1, "data": 1, "rope": 1, "kernels": 1,
    "training": 2,
    "hf": 3, "upstream": 3, "launch": 3, "testing": 3, "inference": 3,
    "evaluation": 4, "rl": 4, "synth": 4,
    "plugin": 5,
    "cli": 6, "demo": 6,
}
SIDEWAYS = {
    ("checkpoint_check", "checkpoint_layout"): "checking a save directory reads the layout's names",
    ("cpu_mode", "patching"): "the CPU mode's changes are patches of the registry",
    ("megatron_fixes", "patching"): "the fixes to megatron-core are patches of the registry",
    ("kernels", "model"): "the fused modules are drop-in versions of the model's (InstellaRMSNorm, full-width "
                          "QK-norm) and the fused spec starts from the model's spec",
    ("rl", "evaluation"): "GRPO's reward is the answer checker that pass@k evaluation uses, and GRPO runs "
                          "downstream evaluation between steps",
    ("synth", "evaluation"): "synthesised data is decontaminated against the evaluation tasks' test sets",
}
LAZY_AT_EDGE = {
    "instella_plugin.data.cli": "each action's module imports megatron-core's dataset code (seconds); "
                                "`instella data --help` stays instant",
    "instella_plugin.demo": "the demo corpus writer imports megatron-core (seconds); `--help` stays instant",
    "instella_plugin.hf.convert_cli": "the converter imports torch.distributed.checkpoint (and sympy, +1 s); "
                                      "`instella convert --help` does not need it",
    "instella_plugin.hf.merge_cli": "the same for `instella merge --help`",
    "instella_plugin.evaluation.cli": "the backends import torch, transformers and megatron-core (seconds); "
                                      "`instella eval --help` does not need them",
    "instella_plugin.inference.cli": "checking a checkpoint and building the generator import megatron-core; "
                                     "`instella generate --help` does not need it",
}
# Modules other work is rewriting (issue 13: the run config and composable trainer, the patch registry,
# the layer-spec providers) that still import package modules inside functions; empty it as those
# land. Nothing may join it.
KNOWN_LOCAL_IMPORTS = set()


def _modules():
    """{module name: path} of every module of the package."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))[:-3].split(os.sep)
                out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, f)
    return out


MODULES = _modules()


def component(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def _target(name: str) -> str:
    """The package module an import of ``name`` runs (its longest importable prefix)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


class _Imports(ast.NodeVisitor):
    """(target module, line, kind) for each package import; kind: top, local, typing or string."""

    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package, self.found = module, is_package, []
        self._depth, self._typing = 0, 0

    def _kind(self):
        return "typing" if self._typing else ("local" if self._depth else "top")

    def _add(self, name, node, kind=None):
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            self.found.append((_target(name), node.lineno, kind or self._kind()))

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:
            parts = self.module.split(".")
            parent = parts if self.is_package else parts[:-1]
            parent = parent[:len(parent) - node.level + 1]
            base = ".".join(parent + ([base] if base else []))
        for alias in node.names:  # `from pkg import sub` imports the module pkg.sub when there is one
            full = f"{base}.{alias.name}"
            self._add(full if full in MODULES else base, node)

    def visit_FunctionDef(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_If(self, node):
        test = node.test
        typing_only = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        self._typing += typing_only
        for child in node.body:
            self.visit(child)
        self._typing -= typing_only
        for child in node.orelse:
            self.visit(child)

    def visit_Constant(self, node):
        if isinstance(node.value, str) and node.value in MODULES:
            self._add(node.value, node, "string")


def _imports():
    """{module: [(target, line, kind)]}, self-imports dropped."""
    out = {}
    for module, path in MODULES.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        visitor = _Imports(module, path.endswith("__init__.py"))
        visitor.visit(tree)
        out[module] = [(t, line, kind) for t, line, kind in visitor.found if t != module]
    return out


IMPORTS = _imports()


def _allowed(src: str, dst: str) -> bool:
    a, b = component(src), component(dst)
    return a == b or LAYERS[a] > LAYERS[b] or (a, b) in SIDEWAYS


def test_every_component_has_a_layer():
    assert sorted({component(m) for m in MODULES} - set(LAYERS)) == [], \
        "a new top-level module or folder of instella_plugin: give it a layer in LAYERS"
    assert all(LAYERS[a] == LAYERS[b] for a, b in SIDEWAYS), "SIDEWAYS lists arrows within one layer only"


def test_imports_point_down_the_layers():
    wrong = sorted({f"{src}:{line} imports {dst} ({component(src) or PACKAGE} -> {component(dst) or PACKAGE})"
                    for src, found in IMPORTS.items() for dst, line, _ in found if not _allowed(src, dst)})
    assert wrong == [], "imports against the layers (tests/test_architecture.py says which way they go):\n" + \
        "\n".join(wrong)


def test_layer_rule_and_import_reader():
    assert _allowed("instella_plugin.hf.convert", "instella_plugin.checkpoint_layout")
    assert _allowed("instella_plugin.kernels.modules", "instella_plugin.model.rms_norm")  # SIDEWAYS
    assert not _allowed("instella_plugin.model.rms_norm", "instella_plugin.kernels.modules")
    assert not _allowed("instella_plugin.training.loop", "instella_plugin.hf.convert")
    assert not _allowed("instella_plugin.hf.convert", "instella_plugin.launch.submit")
    assert not _allowed("instella_plugin.checkpoint_layout", "instella_plugin.model.config")
    source = ("from typing import TYPE_CHECKING\n"
              "from instella_plugin.hf import convert\n"
              "from . import formats\n"
              "from ..model.config import InstellaConfig\n"
              "if TYPE_CHECKING:\n    from instella_plugin.training import loop\n"
              "def f():\n    import instella_plugin.data.sft.nothing_here\n"
              "NAME = 'instella_plugin.rope.cli'\n")
    reader = _Imports("instella_plugin.hf.merge", is_package=False)
    reader.visit(ast.parse(source))
    assert reader.found == [("instella_plugin.hf.convert", 2, "top"), ("instella_plugin.hf.formats", 3, "top"),
                            ("instella_plugin.model.config", 4, "top"), ("instella_plugin.training.loop", 6, "typing"),
                            ("instella_plugin.data.sft", 8, "local"), ("instella_plugin.rope.cli", 9, "string")]


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                scc = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    scc.append(member)
                    if member == node:
                        break
                if len(scc) > 1:
                    found.append(sorted(scc))
    return found


def test_no_import_cycles():
    graph = {m: {t for t, _, kind in found if kind in ("top", "local")} for m, found in IMPORTS.items()}
    assert _cycles(graph) == [], "modules that import each other (move the shared piece into one of them, or " \
                                 "below both)"


def test_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert sorted(_cycles(graph)) == [["a", "b", "c"], ["d", "e"]]


def test_package_imports_are_at_module_top():
    local = sorted({f"{src}:{line} imports {dst} inside a function"
                    for src, found in IMPORTS.items() for dst, line, kind in found
                    if kind == "local" and src not in LAZY_AT_EDGE and src not in KNOWN_LOCAL_IMPORTS})
    assert local == [], "import the package's own modules at module top (a heavy third-party import may stay " \
                        "local):\n" + "\n".join(local)
    stale = sorted(m for m in {*KNOWN_LOCAL_IMPORTS, *LAZY_AT_EDGE} if not any(k == "local" for _, _, k in IMPORTS[m]))
    assert stale == [], f"modules listed with local package imports that have none left; remove them: {stale}"


@pytest.mark.parametrize("module", ["instella_plugin.checkpoint_layout"])
def test_base_modules_import_only_the_standard_library(module):
    with open(MODULES[module], encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert sorted(names - set(sys.stdlib_module_names)) == []
