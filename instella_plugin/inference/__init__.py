"""Text generation: megatron-core's inference engine on Instella checkpoints, and other generators.

Everything that needs text from a model (``instella generate``, generation tasks of ``instella eval``,
GRPO rollouts, data synthesis) talks to a :class:`~instella_plugin.inference.api.TextGenerator`.
"""
