"""Instella-Math SFT 2's summed token loss (``--sft-loss-reduction sum``, the recipe ``math-sft2``).

megatron divides the gradients by the count the loss function returns, summed over micro-batches and
data-parallel ranks. With ``sum`` that count is the number of sequences, so over a global batch the
gradient is d/dw [sum of every sequence's token losses / number of sequences]; with ``token-mean`` it
is the number of tokens. Checked on the loss function's returns and through the plugin's forward step.
"""
from functools import partial

import torch

from instella_plugin.plugin import InstellaPlugin
from instella_plugin.training.arguments import parse_args
from instella_plugin.training.forward_step import forward_step, loss_func


def test_sum_reduction_counts_sequences_and_keeps_the_reported_token_mean():
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])  # row 3: padding only
    loss, count, report = loss_func(mask, nll, per_sequence=True)
    assert float(loss) == 2 + 3 + 5 + 6 + 7 + 8 and int(count) == 2  # summed tokens, two sequences
    assert report["lm loss"].tolist() == [31.0, 6.0]  # the logged loss stays per token
    loss_mean, tokens, _ = loss_func(mask, nll)
    assert float(loss_mean) == 31.0 and int(tokens) == 6


def test_math_sft2_recipe_selects_the_summed_loss(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    plugin = InstellaPlugin()
    for recipe, per_sequence in (("math-sft2", True), ("math-sft1", False)):
        run, _ = parse_args(["--plugin", "instella", "--instella-recipe", recipe, "--mock-data", "--train-iters", "1000",
                             "--lr-decay-iters", "1000", "--micro-batch-size", "1", "--global-batch-size", "1"])
        step = plugin.forward_step(run, None, None, resumed_own_run=False, device=torch.device("cpu"))
        if per_sequence:
            assert isinstance(step, partial) and step.func is forward_step and step.keywords == {"per_sequence": True}
        else:
            assert step is forward_step
