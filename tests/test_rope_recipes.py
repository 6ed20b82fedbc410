"""The Instella-Long recipes carry INSTELLA.md's numbers and parse as trainer arguments."""
import pytest

from instella_plugin.plugin import load_recipe
from instella_plugin.rope.scaling import rope_base_for_context
from instella_plugin.rope.schedule import RopeSchedule

COMMON = dict(lr=2e-5, lr_warmup_init=2e-6, min_lr=2e-8, lr_decay_style="linear", packed_documents=True,
              recompute_granularity="full", cp_comm_type="a2a", model_preset="instella-3b",
              override_rope_theta=True, rope_schedule="stepwise", micro_batch_size=1)
PHASES = {
    "long-phase1": dict(seq_length=65536, rotary_base=514640, train_iters=5000, lr_decay_iters=5000,
                        global_batch_size=64, lr_warmup_iters=500, context_parallel_size=1,
                        data_blend="long-phase1", finetune=True),
    "long-phase2": dict(seq_length=262144, rotary_base=3691950, train_iters=2500, lr_decay_iters=2500,
                        global_batch_size=32, lr_warmup_iters=250, context_parallel_size=4,
                        data_blend="long-phase2", reset_iteration=True),
}


class _View:
    """The run config's flags and layout, for terse assertions."""

    def __init__(self, run):
        self.run = run

    def __getattr__(self, name):
        if name in ("num_microbatches", "data_parallel_size"):
            return getattr(self.run.layout, {"data_parallel_size": "dp"}.get(name, name))
        return getattr(self.run.flags, name)


@pytest.mark.parametrize("name", sorted(PHASES))
def test_long_recipe_numbers(name):
    recipe = load_recipe(name)
    for key, want in {**COMMON, **PHASES[name]}.items():
        assert recipe.get(key) == want, key
    # what is kept and reset: phase 1 takes weights only, phase 2 keeps the optimizer
    assert recipe.get("finetune", False) != recipe.get("reset_iteration", False)
    assert RopeSchedule.from_recipe(recipe).theta_at(recipe["train_iters"] - 1) == recipe["rotary_base"]
    tokens = recipe["train_iters"] * recipe["global_batch_size"] * recipe["seq_length"]
    assert tokens == {"long-phase1": 20_971_520_000, "long-phase2": 20_971_520_000}[name]


def test_thetas_follow_the_scaling_law():
    assert load_recipe("long-phase1")["rotary_base"] == round(rope_base_for_context(65536))
    # the official config rounds 3,691,949.2 up to 3,691,950
    assert load_recipe("long-phase2")["rotary_base"] == round(rope_base_for_context(262144)) + 1


@pytest.mark.parametrize("name", sorted(PHASES))
def test_recipes_parse_as_trainer_arguments(name, monkeypatch):
    from instella_plugin.training.arguments import parse_args

    monkeypatch.setenv("WORLD_SIZE", "8")
    run, _ = parse_args(["--plugin", "instella", "--instella-recipe", name, "--data-root", "/nonexistent"])
    args = _View(run)
    assert args.rotary_base == PHASES[name]["rotary_base"] and args.seq_length == PHASES[name]["seq_length"]
    assert args.context_parallel_size == PHASES[name]["context_parallel_size"]
    assert args.num_microbatches * args.micro_batch_size * args.data_parallel_size == args.global_batch_size
