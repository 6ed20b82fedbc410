"""The trainer is parts another outer loop can drive: a few-line loop of its own batches resumes exactly."""
import pytest
import torch

from instella_plugin.testing.distributed import run_distributed
from instella_plugin.testing.trainer import TINY_MODEL

pytestmark = pytest.mark.dist


def _own_batches(step: int, seq: int = 32, vocab: int = 500):
    """The outer loop's data, not the trainer's: a seeded random global batch of 4, two micro-batches."""
    tokens = torch.randint(0, vocab, (4, seq + 1), generator=torch.Generator().manual_seed(step))
    return [dict(tokens=tokens[i:i + 2, :-1], labels=tokens[i:i + 2, 1:], loss_mask=torch.ones(2, seq),
                 position_ids=torch.arange(seq).expand(2, seq)) for i in (0, 2)]


def _custom_loop(save_dir: str):
    from instella_plugin.training.arguments import parse_args
    from instella_plugin.training.trainer import Trainer

    argv = TINY_MODEL + ["--tensor-model-parallel-size", "2", "--train-iters", "4", "--micro-batch-size", "2",
                         "--global-batch-size", "4", "--save", save_dir]
    run, plugin = parse_args(argv)
    straight = Trainer(run, plugin)
    losses = []
    for step in range(4):
        losses.append(straight.train_step(_own_batches(step))["loss"])
        if straight.iteration == 2:
            straight.save()
    resumed = Trainer(*parse_args(argv + ["--load", save_dir]))
    start = resumed.iteration
    again = [resumed.train_step(_own_batches(step))["loss"] for step in range(start, 4)]
    return {"losses": losses, "start": start, "again": again, "consumed": resumed.consumed}


def test_custom_outer_loop_trains_and_resumes_exactly(tmp_path):
    for res in run_distributed(_custom_loop, 2, str(tmp_path / "ckpt"), tp=2):
        assert res["start"] == 2 and res["consumed"] == 16
        assert res["again"] == res["losses"][2:]  # bitwise: the same weights, optimizer state and RNG
        assert res["losses"][3] < res["losses"][0]
