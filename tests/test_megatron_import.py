"""megatron-core imported with torch.compile deferred: no TorchDynamo at start-up, the same functions."""
import subprocess
import sys
import textwrap


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_megatron_core_imports_without_dynamo_and_its_fusions_still_compile():
    out = _python("""
        import sys, torch
        real = torch.compile
        from instella_plugin.megatron_import import compile_deferred, import_megatron_core
        import_megatron_core()
        import megatron.core.fusions.fused_bias_swiglu as fused
        print("dynamo after import:", "torch._dynamo" in sys.modules, torch.compile is real)
        # a fusion megatron decorated with torch.compile is the same function, compiled on first call
        print("wrapped:", fused.swiglu.__wrapped__.__name__, fused.swiglu.__module__)
        with compile_deferred():
            double = torch.compile(backend="eager")(lambda x: 2 * x)
            later = torch.compile(lambda x: x + 1, backend="eager")
        x = torch.arange(4.0)
        print("before call:", "torch._dynamo" in sys.modules)
        print("values:", double(x).tolist(), later(x).tolist())
        print("after call:", "torch._dynamo" in sys.modules)
    """)
    assert "dynamo after import: False True" in out
    assert "wrapped: swiglu megatron.core.fusions.fused_bias_swiglu" in out
    assert "before call: False" in out
    assert "values: [0.0, 2.0, 4.0, 6.0] [1.0, 2.0, 3.0, 4.0]" in out
    assert "after call: True" in out  # the real torch.compile ran, with the options given
