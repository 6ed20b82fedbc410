"""Instella language models on Megatron-Core.

Importing the package is cheap: megatron-core and transformers are imported by the submodules that
need them. ``instella_plugin.hf`` registers the Hugging Face classes with the Auto classes.
"""
__version__ = "0.1.0"

import warnings as _warnings

# megatron-core warns once per module when Transformer Engine / apex are absent; the fallbacks are
# expected on CPU and in plain PyTorch environments, and the layer-spec name already says which
# backend runs.
for _msg in ("Transformer Engine and Apex are not installed", "Apex is not installed",
             "When using async grad allreduce", ".*is deprecated. Please use"):
    _warnings.filterwarnings("ignore", message=_msg)
