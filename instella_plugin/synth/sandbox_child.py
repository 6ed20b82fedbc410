"""The process that runs one generated program (started by ``sandbox.run_program``, never imported).

Runs as ``python -I -S sandbox_child.py`` under the resource limits the parent set: reads one JSON
request on stdin (the program, the calls to make, the per-call time limit), executes the program with
restricted builtins (no ``open``, ``eval``, ``exec``...; ``import`` only of arithmetic modules) and an
audit hook that stops any audited action (opening files, listing directories, sockets, processes...)
should the program find a way past the builtins, makes each call under a wall-clock alarm, and writes
one JSON answer on its original stdout. What the program
prints is discarded. Only the standard library: this file runs outside the package, in isolated mode.
"""
import builtins
import io
import json
import math
import os
import signal
import sys

ALLOWED_MODULES = ("math", "fractions", "decimal", "statistics", "cmath", "numbers")
BLOCKED_BUILTINS = ("open", "exec", "eval", "compile", "__import__", "input", "breakpoint", "globals", "locals",
                    "vars", "getattr", "setattr", "delattr", "memoryview", "help", "exit", "quit", "__loader__",
                    "__spec__", "__build_class__")


class CallTimeout(BaseException):
    """A call ran past its time limit (BaseException: a program's ``except Exception`` cannot swallow it)."""


class Blocked(BaseException):
    """An audited action (file, process, socket, import machinery...) the program is not allowed."""


AUDIT_ALLOWED = frozenset({"compile", "exec"})  # this script's own compile + exec of the program


def _audit(event, args):
    # Installed once the program is about to run: arithmetic needs no audited action, so any event but
    # the program's own compile/exec means it found a way to the file system, processes or network.
    if event not in AUDIT_ALLOWED:
        raise Blocked(event)


def _guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level or name.split(".")[0] not in ALLOWED_MODULES:
        raise ImportError(f"imports {name}")
    return __import__(name, globals, locals, fromlist, level)


def _safe_builtins():
    safe = {k: v for k, v in vars(builtins).items() if k not in BLOCKED_BUILTINS}
    safe["__import__"] = _guarded_import
    safe["__build_class__"] = builtins.__build_class__  # class statements in a program
    return safe


def _number(value):
    """A JSON-safe number, or raise TypeError for anything else (bools, strings, containers)."""
    if isinstance(value, bool) or not hasattr(value, "__float__") or isinstance(value, complex):
        raise TypeError(f"returned {type(value).__name__}, not a number")
    if isinstance(value, int):
        return value
    f = float(value)
    if not math.isfinite(f):
        raise ValueError(f"returned {f}")
    return f


def _reason(exc: BaseException) -> str:
    if isinstance(exc, CallTimeout):
        return "timeout"
    if isinstance(exc, Blocked):
        return f"blocked {exc}"
    if isinstance(exc, MemoryError):
        return "memory limit"
    if isinstance(exc, ImportError) and str(exc).startswith("imports "):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "raised RecursionError"
    return f"raised {type(exc).__name__}"


def _on_alarm(signum, frame):
    raise CallTimeout()


def main() -> None:
    request = json.loads(sys.stdin.read())
    out = os.fdopen(os.dup(1), "w")
    sys.stdout = sys.stderr = io.StringIO()  # the program's prints are not the answer
    signal.signal(signal.SIGALRM, _on_alarm)
    timeout = float(request["timeout_s"])
    for name in ALLOWED_MODULES:  # imported now: the program's imports are then cache hits, not audited loads
        __import__(name)
    sys.addaudithook(_audit)
    namespace = {"__builtins__": _safe_builtins(), "__name__": "program"}
    answer = {"loaded": False, "globals": {}, "calls": []}
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        exec(compile(request["source"], "<program>", "exec"), namespace)
        signal.setitimer(signal.ITIMER_REAL, 0)
        answer["loaded"] = True
    except BaseException as exc:  # noqa: BLE001  (anything a program does is a reason, not a crash)
        signal.setitimer(signal.ITIMER_REAL, 0)
        answer["error"] = _reason(exc)
    if answer["loaded"]:
        for name in request.get("globals", ()):
            value = namespace.get(name)
            answer["globals"][name] = value if isinstance(value, (str, int, float, dict, list, type(None))) else repr(value)
        for call in request["calls"]:
            fn = namespace.get(call["function"])
            if not callable(fn):
                answer["calls"].append({"ok": False, "error": f"no function {call['function']}"})
                continue
            kwargs = namespace.get(call["kwargs_global"]) if "kwargs_global" in call else call["kwargs"]
            if not isinstance(kwargs, dict):
                answer["calls"].append({"ok": False, "error": f"no dict {call.get('kwargs_global')}"})
                continue
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout)
                value = fn(**kwargs)
                signal.setitimer(signal.ITIMER_REAL, 0)
                answer["calls"].append({"ok": True, "value": bool(value) if call.get("boolean") else _number(value)})
            except BaseException as exc:  # noqa: BLE001
                signal.setitimer(signal.ITIMER_REAL, 0)
                reason = str(exc) if isinstance(exc, (TypeError, ValueError)) and str(exc).startswith("returned") else _reason(exc)
                answer["calls"].append({"ok": False, "error": reason})
    try:
        text = json.dumps(answer)
    except (TypeError, ValueError):
        text = json.dumps({"loaded": False, "error": "unserialisable globals", "globals": {}, "calls": []})
    out.write(text)
    out.flush()


if __name__ == "__main__":
    main()
