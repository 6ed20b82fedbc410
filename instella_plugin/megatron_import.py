"""Import megatron-core without paying for TorchDynamo at start-up.

megatron-core decorates its fusion functions with ``torch.compile`` while it is imported
(``megatron/core/jit.py``: ``jit_fuser = torch.compile``). Decorating costs nothing in compilation (that
happens on a function's first call) but imports TorchDynamo and Inductor: about 2.5 s of every
process's start on a 2-core machine, paid again by each rank of a launch. ``import_megatron_core()``
imports megatron-core while ``torch.compile`` stands in as a decorator that calls the real
``torch.compile`` on the decorated function's first call. Behaviour is unchanged (the same function is
compiled with the same options, at the same moment); a process that never calls a compiled fusion
(the CPU mode) never imports TorchDynamo. ``torch.compile`` is restored before the function returns.

The trainer's entry, the multi-process test helper and the heavy ``instella`` subcommands call it
first; anything importing megatron-core some other way simply pays the usual cost.
"""
import contextlib
import functools
import inspect
import sys


def _compile_on_first_call(real_compile):
    def compile_later(model=None, **options):
        if model is None:  # used as @torch.compile(**options)
            return lambda fn: compile_later(fn, **options)
        if not inspect.isfunction(model):  # modules and callables keep the real behaviour
            return real_compile(model, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = real_compile(model, **options)
            return compiled(*args, **kwargs)
        return call
    return compile_later


@contextlib.contextmanager
def compile_deferred():
    """Within the block, ``torch.compile(fn)`` returns a function that compiles ``fn`` on first call."""
    import torch
    real = torch.compile
    torch.compile = _compile_on_first_call(real)
    try:
        yield
    finally:
        torch.compile = real


def import_megatron_core() -> None:
    """Import megatron-core (once per process) with ``torch.compile`` deferred; see the module docstring."""
    if "megatron.core" in sys.modules:
        return
    with compile_deferred():
        import megatron.core  # noqa: F401
