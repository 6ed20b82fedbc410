"""The run-time side of the Megatron-LM integration (``patches/``): one plugin, two hosts.

Upstream ``pretrain_gpt.py``, patched by ``patches/apply.sh``, creates a ``PluginHost`` when it sees
``--plugin NAME`` (before it imports ``megatron.training``) and takes its four entry points from
``PluginHost.hooks``. ``host`` adapts Megatron-LM's calling conventions to the plugin seam;
``registry`` holds the opt-in, idempotent run-time patches (``runtime``: every run; ``cpu``: the CPU
mode). Nothing here is imported by our own trainer, and importing it patches nothing.
"""
from instella_plugin.upstream.host import PluginHost, wants_plugin

__all__ = ["PluginHost", "wants_plugin"]
