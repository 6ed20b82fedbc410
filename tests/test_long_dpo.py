"""Long DPO: the recipe names no RoPE theta, so the run takes the starting checkpoint's.

Fast: the run configuration of ``long-dpo`` with ``--load`` of a checkpoint whose metadata says
theta 3,691,950 (and the preset's 10,000 without one); a recipe or flag that names a different theta
is refused on load unless ``--override-rope-theta``. Slow: a real DPO run (the long-dpo recipe at tiny
size) from a checkpoint trained at theta 3,691,950 logs that theta at every step.
"""
import json
import math

import pytest
import yaml

from instella_plugin.testing.trainer import TINY_MODEL, read_log, run_trainer
from instella_plugin.training.recipes import load_recipe

LONG_THETA = 3691950.0


def _fake_checkpoint(path, theta):
    path.mkdir(parents=True)
    (path / "instella_meta.json").write_text(json.dumps({"rope_theta": theta, "iteration": 250}))
    return str(path)


def _args(*extra):
    return ["--plugin", "instella", "--instella-recipe", "long-dpo", "--data-root", "/nonexistent",
            "--train-iters", "10", "--lr-decay-iters", "10", "--mock-data", *extra]


def test_long_dpo_recipe_names_no_theta_and_keeps_the_dpo_numbers():
    long_dpo, dpo = load_recipe("long-dpo"), load_recipe("dpo")
    assert "rotary_base" not in long_dpo and long_dpo["seq_length"] == 2048
    same = {k: v for k, v in dpo.items() if k not in ("name", "description", "rotary_base")}
    assert {k: long_dpo[k] for k in same} == same


def test_theta_comes_from_the_starting_checkpoint(tmp_path, monkeypatch):
    from instella_plugin.training.arguments import parse_args

    monkeypatch.setenv("WORLD_SIZE", "8")
    start = _fake_checkpoint(tmp_path / "sft" / "iter_0000250", LONG_THETA)
    run, plugin = parse_args(_args("--load", start))
    assert run.model.rotary_base == LONG_THETA
    assert run.plugin_values["rope"].theta_at(0) == LONG_THETA == run.plugin_values["rope"].theta_at(9)
    plugin.check_resume(run, {"rope_theta": LONG_THETA, "iteration": 250})  # agrees: accepted
    run, _ = parse_args(_args())
    assert run.model.rotary_base == 10000.0  # no checkpoint: the preset's theta
    # a theta named on purpose that differs from the checkpoint's is refused on load
    run, plugin = parse_args(_args("--load", start, "--rotary-base", "10000"))
    assert run.model.rotary_base == 10000.0
    with pytest.raises(SystemExit, match="override-rope-theta"):
        plugin.check_resume(run, {"rope_theta": LONG_THETA, "iteration": 250})


@pytest.mark.slow
@pytest.mark.dist
def test_dpo_from_a_long_checkpoint_trains_at_its_theta(tmp_path):
    from instella_plugin.data.demo_corpus import build_demo_corpus

    data = str(tmp_path / "data")
    build_demo_corpus(data, num_docs=40, num_chats=16)
    start = tmp_path / "start"  # the "long SFT" model: one LM step at theta 3,691,950
    run_trainer(1, TINY_MODEL + ["--train-iters", "1", "--lr-warmup-iters", "0", "--global-batch-size", "2", "--micro-batch-size", "2",
                                 "--rotary-base", str(int(LONG_THETA)), "--model-preset", "instella-tiny",
                                 "--save", start])
    recipe = dict(load_recipe("long-dpo"), model_preset="instella-tiny", seq_length=32, global_batch_size=4,
                  micro_batch_size=2, train_iters=3, lr_decay_iters=3, lr=1e-4, bf16=False,
                  use_distributed_optimizer=False, data_blend="tiny-dpo", log_interval=1)
    recipe.pop("name")
    (tmp_path / "long-dpo-tiny.yaml").write_text(yaml.safe_dump(recipe))
    dpo = ["--plugin", "instella", "--instella-recipe", tmp_path / "long-dpo-tiny.yaml", "--data-root", data,
           "--device", "cpu", "--no-plot", "--load", start]
    run_trainer(1, dpo + ["--save", tmp_path / "dpo"])
    losses, _ = read_log(tmp_path / "dpo")
    with open(tmp_path / "dpo" / "train_log.jsonl", encoding="utf-8") as f:
        thetas = {json.loads(line).get("rope_theta") for line in f if "iteration" in line}
    print(f"long-dpo tiny: losses {losses}, rope theta {thetas}")
    assert thetas == {LONG_THETA}
    assert abs(losses[1] - math.log(2)) < 1e-6  # policy == reference at the first step
    refused = run_trainer(1, dpo + ["--save", tmp_path / "dpo2", "--rotary-base", "10000"], check=False)
    assert refused.returncode != 0 and "override-rope-theta" in refused.stdout + refused.stderr
