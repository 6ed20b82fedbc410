"""What a submission needs from a training recipe: parallel sizes, batch sizes, seeds, data blend and
dataset type (a ``grpo`` recipe reads one prompt file instead of a blend).

The recipe is read by the trainer's reader (``training.recipes``); this module picks the few values
the launcher checks before submitting, under the launcher's short names (the trainer remains the
authority on every other setting).
"""
from instella_plugin.training.recipes import RecipeError, known_recipes, load_recipe

SHORT_NAMES = {
    "tensor_model_parallel_size": "tp",
    "pipeline_model_parallel_size": "pp",
    "context_parallel_size": "cp",
    "micro_batch_size": "micro_batch_size",
    "global_batch_size": "global_batch_size",
    "train_iters": "train_iters",
    "seed": "seed",
    "seeds": "seeds",
    "data_blend": "data_blend",
    "dataset_type": "dataset_type",
    "grpo_group_size": "grpo_group_size",
}


def available_recipes():
    return known_recipes()


def recipe_defaults(name):
    """{tp, pp, cp, micro_batch_size, global_batch_size, train_iters, seed, seeds, data_blend, dataset_type,
    grpo_group_size} as far as the recipe states them (missing keys are absent)."""
    try:
        recipe = load_recipe(name)
    except RecipeError as e:
        raise ValueError(str(e)) from None
    found = {short: recipe[key] for key, short in SHORT_NAMES.items() if key in recipe}
    if isinstance(found.get("seeds"), int):
        found["seeds"] = [found["seeds"]]
    return found
