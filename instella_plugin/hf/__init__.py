"""Hugging Face interop for Instella: transformers classes, ``instella convert`` and ``instella merge``.

Importing this package registers ``model_type: "instella"`` with ``AutoConfig`` and
``InstellaForCausalLM`` with ``AutoModelForCausalLM`` (no remote code needed). The model module,
which pulls in transformers' modeling stack (seconds), is imported only when a model is first
built: the Auto registry holds a small stand-in whose ``from_pretrained`` / ``from_config``
hand over to the real class. ``InstellaForCausalLM`` and friends are importable from here too.
"""
import importlib

from transformers import AutoConfig, AutoModelForCausalLM

from instella_plugin.hf.configuration_instella import InstellaConfig

_MODELING = "instella_plugin.hf.modeling_instella"
_LAZY = ("InstellaForCausalLM", "InstellaModel", "InstellaPreTrainedModel")


def _real_class():
    return importlib.import_module(_MODELING).InstellaForCausalLM


class _LazyInstellaForCausalLM:
    """Auto-registry stand-in for ``InstellaForCausalLM`` (the real class is imported on first use)."""

    config_class = InstellaConfig
    __name__ = "InstellaForCausalLM"

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return _real_class().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, *args, **kwargs):
        return _real_class()._from_config(*args, **kwargs)

    @classmethod
    def from_config(cls, *args, **kwargs):
        return _real_class()._from_config(*args, **kwargs)

    def __new__(cls, *args, **kwargs):
        return _real_class()(*args, **kwargs)


def register() -> None:
    """Idempotent: make the Auto classes resolve ``model_type: "instella"``."""
    AutoConfig.register("instella", InstellaConfig, exist_ok=True)
    AutoModelForCausalLM.register(InstellaConfig, _LazyInstellaForCausalLM, exist_ok=True)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_MODELING), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register()

__all__ = ["InstellaConfig", "register", *_LAZY]
