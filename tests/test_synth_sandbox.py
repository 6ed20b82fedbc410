"""The sandbox for generated programs: what it runs, what it refuses, and that the refusal holds in the
process itself (static check off), with the reason each failure is counted under."""
import os

import pytest

from instella_plugin.synth.sandbox import SandboxLimits, check_program, run_program

LIMITS = SandboxLimits(call_timeout_s=1.0, memory_mb=256)
CALL = [{"function": "answer", "kwargs": {"a": 3, "b": 4}}]


def _one(source, static_check=True):
    run = run_program(source, CALL, ("P",), LIMITS, static_check=static_check)
    return run.reason or (run.calls[0]["error"] if not run.calls[0]["ok"] else run.calls[0]["value"])


@pytest.mark.parametrize("source,expected", [
    ("def answer(a, b):\n    return a * b + 1", 13),
    ("import math\nfrom fractions import Fraction\ndef answer(a, b):\n    return math.sqrt(Fraction(a * a + b * b))", 5.0),
    ("print('noise')\ndef answer(a, b):\n    print('more noise')\n    return a / b", 0.75),
    ("def answer(a, b):\n    return a / (b - 4)", "raised ZeroDivisionError"),
    ("def answer(a, b):\n    while True:\n        pass", "timeout"),
    ("def answer(a, b):\n    while True:\n        try:\n            pass\n        except Exception:\n            pass", "timeout"),
    ("def answer(a, b):\n    return 10 ** 10 ** 8", "timeout"),
    ("while True:\n    pass\ndef answer(a, b):\n    return 1", "timeout"),
    ("def answer(a, b):\n    x = []\n    while True:\n        x.append(bytearray(10 ** 8))", "memory limit"),
    ("def answer(a, b):\n    n = 1\n    while True:\n        x = [0] * n\n        n *= 10", "memory limit"),
    ("def answer(a, b):\n    return len([0] * 10 ** 10)", "memory limit"),
    ("import os\ndef answer(a, b):\n    return 1", "imports os"),
    ("import subprocess\ndef answer(a, b):\n    return 1", "imports subprocess"),
    ("from socket import socket\ndef answer(a, b):\n    return 1", "imports socket"),
    ("def answer(a, b):\n    return open('/etc/hostname').read()", "uses open"),
    ("def answer(a, b):\n    return __import__('os').getpid()", "uses __import__"),
    ("def answer(a, b):\n    return ().__class__.__base__.__subclasses__()", "uses attribute __subclasses__"),
    ("def answer(a, b):\n    return 'seven'", "returned str, not a number"),
    ("def answer(a, b):\n    return float('inf')", "returned inf"),
    ("def answer(a, b) return 1", "syntax error (line 1)"),
    ("def answer(a, b):\n    return answer(a, b)", "raised RecursionError"),
])
def test_program_outcomes(source, expected):
    assert _one(source) == expected


def test_refusals_hold_in_the_process_without_the_static_check(tmp_path):
    # the child's own guard: imports other than arithmetic modules fail, file access has no builtin
    assert _one("import os\ndef answer(a, b):\n    return 1", static_check=False) == "imports os"
    assert _one("import socket\ndef answer(a, b):\n    return 1", static_check=False) == "imports socket"
    assert _one("def answer(a, b):\n    return __import__('subprocess')", static_check=False) == "imports subprocess"
    assert _one(f"def answer(a, b):\n    return open({str(tmp_path / 'x')!r}, 'w')", static_check=False) == "raised NameError"
    assert not os.path.exists(tmp_path / "x")
    assert check_program("import os") == "imports os" and check_program("x = 1") is None
    # the way back to the interpreter's globals through a running generator's frame: refused by name, and
    # stopped by the audit hook in the process when the static check is off
    escape = ("def answer(a, b):\n    g = (g.gi_frame.f_back.f_back for _ in [1])\n"
              "    return len(next(g).f_globals['os'].listdir('/'))")
    assert _one(escape) == "uses attribute f_back"
    assert _one(escape, static_check=False) == "blocked object.__getattr__"


def test_globals_and_calls_with_the_programs_own_parameters():
    src = ("PARAMETERS = {'a': 2, 'b': 5}\nQUESTION = 'A has {a} and B {b}.'\n"
           "def constraints(a, b):\n    return a < b\n"
           "def answer(a, b):\n    return a + b\n")
    run = run_program(src, [{"function": "answer", "kwargs_global": "PARAMETERS"},
                            {"function": "constraints", "kwargs": {"a": 9, "b": 1}, "boolean": True},
                            {"function": "missing", "kwargs": {}}], ("PARAMETERS", "QUESTION", "NOPE"), LIMITS)
    assert run.reason is None
    assert run.globals == {"PARAMETERS": {"a": 2, "b": 5}, "QUESTION": "A has {a} and B {b}.", "NOPE": None}
    assert run.calls == [{"ok": True, "value": 7}, {"ok": True, "value": False},
                         {"ok": False, "error": "no function missing"}]


def test_a_timeout_is_per_call():
    src = "def answer(a, b):\n    if a > 5:\n        while True:\n            pass\n    return a"
    run = run_program(src, [{"function": "answer", "kwargs": {"a": k, "b": 0}} for k in (1, 9, 2)], (), LIMITS)
    # the looping call is stopped by its own alarm: the calls after it still run in the same process
    assert [c.get("value", c.get("error")) for c in run.calls] == [1, "timeout", 2]
