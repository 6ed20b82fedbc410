"""Instella language models on Megatron-Core.

Importing the package is cheap: megatron-core and transformers are imported by the submodules that
need them. ``instella_plugin.hf`` registers the Hugging Face classes with the Auto classes.
"""
__version__ = "0.1.0"
