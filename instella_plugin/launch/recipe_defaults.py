"""What a submission needs from a training recipe: parallel sizes, batch sizes, seeds and data blend.

Recipes are YAML files in ``instella_plugin/recipes/`` owned by the trainer; this module only reads
the few values the launcher checks before submitting (the trainer remains the authority on every
other setting). Keys are found wherever they sit in the recipe's mapping, under their Megatron flag
names with dashes or underscores (``tensor_model_parallel_size`` / ``tensor-model-parallel-size``).
"""
from pathlib import Path

import yaml

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
# The recipes the trainer defines (the files may be added later than this module is used).
KNOWN_RECIPES = ("stage1", "stage2", "sft", "tiny-cpu", "long-phase1", "long-phase2")

ALIASES = {
    "tp": ("tensor_model_parallel_size",),
    "pp": ("pipeline_model_parallel_size",),
    "cp": ("context_parallel_size",),
    "micro_batch_size": ("micro_batch_size",),
    "global_batch_size": ("global_batch_size",),
    "train_iters": ("train_iters",),
    "seed": ("seed",),
    "seeds": ("seeds",),
    "data_blend": ("data_blend", "blend"),
}


def available_recipes():
    files = {p.stem for p in RECIPES_DIR.glob("*.yaml")} if RECIPES_DIR.is_dir() else set()
    return sorted(files | set(KNOWN_RECIPES))


def _walk(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k).replace("-", "_"), v
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def recipe_defaults(name):
    """{tp, pp, cp, micro_batch_size, global_batch_size, train_iters, seed, seeds, data_blend} as far as
    the recipe file states them (missing keys are absent); {} when the file does not exist yet."""
    if name not in available_recipes():
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(available_recipes())}")
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.exists():
        return {}
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    found = {}
    for key, value in _walk(data):
        for short, names in ALIASES.items():
            if key in names and short not in found and not isinstance(value, dict):
                found[short] = value
    if isinstance(found.get("seeds"), int):
        found["seeds"] = [found["seeds"]]
    return found
