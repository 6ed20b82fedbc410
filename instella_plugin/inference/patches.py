"""Run-time patches of megatron-core's inference that the generator's callers opt into (the package's
patch registry, ``instella_plugin.patching``: each names its target, the version it was written for
and why; ``QUIET.describe()`` lists them).

``static_engine_progress_bar``: megatron's static engine draws a tqdm bar of finished requests on
stderr for every batch. ``instella generate --prompt`` streams the completion to the terminal, where
the bar would interleave with the text, so it applies this patch; a prompts file keeps the bar (its
progress and ETA).
"""
import functools

from instella_plugin.patching import PatchRegistry

QUIET = PatchRegistry("inference", package="megatron-core", version="0.16.1",
                      hint="update instella_plugin/inference/patches.py for the new code")


@QUIET.register("static_engine_progress_bar", "megatron.core.inference.engines.static_engine", "tqdm", wraps=False,
                reason="the per-batch progress bar would interleave with a completion streamed to the terminal; "
                       "created disabled")
def _disabled_progress_bar(original):
    return functools.partial(original, disable=True)
