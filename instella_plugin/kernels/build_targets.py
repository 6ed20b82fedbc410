"""Build targets of the csrc/ kernels, for setup.py (importable without the package or torch).

``extension_modules()`` returns ``(ext_modules, cmdclass)`` for ``setup()``:
- ``instella_plugin.kernels._cpu``: the C++/OpenMP kernels (csrc/cpu), built wherever torch and a
  C++ compiler are present;
- ``instella_plugin.kernels._gpu``: the CUDA kernels (csrc/cuda), built only when the installed torch
  is a CUDA or ROCm build (``torch.version.cuda`` / ``torch.version.hip``) and its toolkit is found.
  On ROCm, torch's BuildExtension hipifies the .cu sources and compiles them with hipcc.

``INSTELLA_KERNELS`` selects targets: ``cpu``, ``cuda`` (the GPU target alone), ``all`` (default:
cpu plus the GPU target where possible) or ``none``. Anything missing yields fewer (or no)
extensions and one log line, never a failed install; at run time the ops then fall back to PyTorch.
"""
import glob
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = ("cpu", "cuda", "all", "none")
# -fno-trapping-math: the kernels never read floating-point exception flags, and without it GCC
# keeps the clamps of exp (math.h) as branches, so the SwiGLU loops do not vectorise below AVX-512;
# -fno-math-errno: nor errno, so sqrt is one instruction (no library call for negative inputs).
# The ISA levels are per-function target attributes (csrc/cpu/isa.h), not flags.
CPU_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]


def _log(msg: str) -> None:
    print(f"instella kernels: {msg}", file=sys.stderr)


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def requested_targets(value=None) -> set:
    """The targets named by INSTELLA_KERNELS (or ``value``); raises on an unknown name."""
    value = (os.environ.get("INSTELLA_KERNELS", "all") if value is None else value).strip().lower()
    if value not in TARGETS:
        raise ValueError(f"INSTELLA_KERNELS={value!r}: expected one of {', '.join(TARGETS)}")
    return {"all": {"cpu", "gpu"}, "cpu": {"cpu"}, "cuda": {"gpu"}, "none": set()}[value]


def cpu_sources():
    return _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))


def gpu_sources():
    return _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
                + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))


def extension_modules():
    wanted = requested_targets()
    if not wanted:
        _log("INSTELLA_KERNELS=none: no native kernels built; ops use the PyTorch fallback")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        _log(f"torch not importable at build time ({e}); no native kernels built "
             "(install torch first, then pip install --no-build-isolation)")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        _log(f"no C++ compiler ({cxx!r}) found; no native kernels built")
        return [], {}
    include = [os.path.join(ROOT, "csrc", "include")]
    exts, built = [], []
    if "cpu" in wanted:
        exts.append(cpp_extension.CppExtension(
            "instella_plugin.kernels._cpu", cpu_sources(), include_dirs=include,
            extra_compile_args=CPU_FLAGS, extra_link_args=["-fopenmp"]))
        built.append("cpu")
    if "gpu" in wanted:
        gpu_flavour = "cuda" if torch.version.cuda else ("rocm" if torch.version.hip else None)
        home = cpp_extension.CUDA_HOME if gpu_flavour == "cuda" else cpp_extension.ROCM_HOME
        if gpu_flavour and home:
            exts.append(cpp_extension.CUDAExtension(
                "instella_plugin.kernels._gpu", gpu_sources(), include_dirs=include,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}))
            built.append(gpu_flavour)
        elif gpu_flavour:
            _log(f"torch is a {gpu_flavour} build but its toolkit was not found; GPU kernels not built")
    _log(f"building targets: {', '.join(built) or 'none'}")
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(
        use_ninja=cpp_extension.is_ninja_available())}
