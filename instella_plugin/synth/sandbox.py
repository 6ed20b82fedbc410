"""Run generated Python programs in a sandbox: a static check, then a separate, limited process.

A program written by a language model is untrusted. ``run_program``:
1. parses it and refuses, before running anything, imports other than arithmetic modules
   (``ALLOWED_MODULES``), the builtins that reach outside (``open``, ``eval``, ``exec``, ``__import__``...)
   dunder attributes and the attributes of frames, generators, tracebacks and code objects (the
   usual ways out of restricted builtins);
2. runs it in a fresh ``python -I -S`` process (``sandbox_child.py``) with an empty environment, an
   empty temporary working directory, its own session (killed as a group), and resource limits:
   address space (``memory_mb``), CPU seconds, no file writes (RLIMIT_FSIZE 0), few file descriptors,
   no child processes (RLIMIT_NPROC 0); each call also has a wall-clock alarm inside the child and
   the whole process a wall-clock limit in the parent. The child's builtins carry a guarded ``import``
   (arithmetic modules only), so there is no socket, file system or process module to reach, and an
   audit hook (``sys.addaudithook``, which cannot be removed) stops any audited action (``open``,
   ``os.listdir``, ``socket.connect``, ``subprocess.Popen``...) should a program get past the builtins.
   Network namespaces need privileges these machines may not grant, so the import guard is what
   keeps the network out; a deployment that can should add ``unshare -n`` (``SandboxLimits.prefix``).
Every failure becomes a short reason (``imports os``, ``timeout``, ``memory limit``, ``raised
ZeroDivisionError``...) that the pipeline counts.
"""
from __future__ import annotations

import ast
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
ALLOWED_MODULES = frozenset({"math", "fractions", "decimal", "statistics", "cmath", "numbers"})
FORBIDDEN_NAMES = frozenset({"open", "exec", "eval", "compile", "__import__", "input", "breakpoint", "globals",
                             "locals", "vars", "getattr", "setattr", "delattr", "memoryview", "help", "exit", "quit",
                             "__builtins__", "__loader__", "__spec__"})

# frames, generators, coroutines, tracebacks and code objects lead back to the interpreter's own globals
INTROSPECTION_PREFIXES = ("f_", "gi_", "cr_", "ag_", "tb_", "co_", "func_", "mro")


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one program run: per call and for the whole process."""
    call_timeout_s: float = 2.0
    memory_mb: int = 512
    max_output_bytes: int = 1 << 20
    prefix: Tuple[str, ...] = ()   # e.g. ("unshare", "-rn") where user namespaces are allowed


@dataclass
class ProgramRun:
    """What one run gave: ``reason`` is None when the program loaded; ``calls`` one dict per call
    (``{"ok": True, "value": ...}`` or ``{"ok": False, "error": reason}``)."""
    reason: Optional[str]
    globals: Dict[str, object] = field(default_factory=dict)
    calls: List[dict] = field(default_factory=list)


def check_program(source: str) -> Optional[str]:
    """The reason a program is refused without running it, or None."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        return f"syntax error (line {exc.lineno})"
    except ValueError:
        return "syntax error (null bytes)"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in ALLOWED_MODULES:
                    return f"imports {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            if node.level or (node.module or "").split(".")[0] not in ALLOWED_MODULES:
                return f"imports {node.module or '.'}"
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES:
            return f"uses {node.id}"
        elif isinstance(node, ast.Attribute) and (node.attr.startswith("__") and node.attr.endswith("__")
                                                  or node.attr.startswith(INTROSPECTION_PREFIXES)):
            return f"uses attribute {node.attr}"
    return None


def _limits(limits: SandboxLimits, cpu_seconds: int):
    memory = limits.memory_mb * 1024 * 1024

    def apply():  # runs in the child between fork and exec
        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    return apply


def run_program(source: str, calls: Sequence[dict] = (), globals_: Sequence[str] = (),
                limits: SandboxLimits = SandboxLimits(), static_check: bool = True) -> ProgramRun:
    """Run ``source`` in the sandbox, then each call ``{"function", "kwargs"[, "boolean"]}`` (or
    ``"kwargs_global": NAME`` to call with a dict the program defines); read back
    the module-level names ``globals_`` (JSON values only). ``static_check=False`` leaves the refusal
    to the process alone (tests show that it holds on its own)."""
    refused = check_program(source) if static_check else None
    if refused:
        return ProgramRun(refused)
    request = json.dumps({"source": source, "calls": list(calls), "globals": list(globals_),
                          "timeout_s": limits.call_timeout_s})
    budget = limits.call_timeout_s * (len(calls) + 1)
    with tempfile.TemporaryDirectory(prefix="instella-sandbox-") as cwd:
        proc = subprocess.Popen([*limits.prefix, sys.executable, "-I", "-S", CHILD], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=cwd, env={},
                                preexec_fn=_limits(limits, int(budget) + 2))
        try:
            out, _ = proc.communicate(request.encode(), timeout=budget + 5.0)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return ProgramRun("timeout")
    if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return ProgramRun("timeout")
    if len(out) > limits.max_output_bytes:
        return ProgramRun("output too large")
    try:
        answer = json.loads(out.decode())
    except (ValueError, UnicodeDecodeError):
        return ProgramRun("memory limit" if proc.returncode == 1 and not out else f"crashed (exit {proc.returncode})")
    if not answer.get("loaded"):
        return ProgramRun(answer.get("error", "did not load"))
    return ProgramRun(None, answer.get("globals", {}), answer.get("calls", []))
