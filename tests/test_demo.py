"""`make demo` end to end (slow tier): the tiny recipe on the demo corpus learns, saves, plots."""
import statistics

import pytest

from instella_plugin.testing.trainer import read_log
from instella_plugin.training.checkpointing import latest_iteration


@pytest.mark.slow
def test_demo_loss_falls_and_writes_checkpoint_and_plot(tmp_path):
    from instella_plugin.demo import main

    assert main(["--out", str(tmp_path)]) == 0
    run = tmp_path / "run"
    train, evals = read_log(run)
    steps = sorted(train)
    assert len(steps) == 200
    assert statistics.mean(train[s] for s in steps[-20:]) < 0.7 * train[steps[0]]
    assert latest_iteration(str(run)) == 200 and evals
    assert (run / "loss.png").stat().st_size > 1000
