"""Recipes: YAML files of flag values (Megatron-LM names, underscores) plus a few recipe-only keys.

One reader serves the trainer (``--instella-recipe``), ``instella submit`` and the examples. A recipe
is a flat mapping; keys that are not flags are ``RECIPE_ONLY``.
"""
import os
from typing import Mapping

import yaml

RECIPE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
RECIPE_ONLY = frozenset({"name", "description", "seeds", "rope_phases"})


class RecipeError(ValueError):
    """An unknown or malformed recipe; the message names it and the fix."""


def known_recipes():
    return sorted(f[:-5] for f in os.listdir(RECIPE_DIR) if f.endswith(".yaml"))


def load_recipe(name_or_path: str) -> dict:
    """The recipe's mapping with its ``name``; a bundled name or a YAML path."""
    path = name_or_path if os.path.isfile(name_or_path) else os.path.join(RECIPE_DIR, f"{name_or_path}.yaml")
    if not os.path.isfile(path):
        raise RecipeError(f"unknown recipe {name_or_path!r}; known recipes: {', '.join(known_recipes())} "
                          "(or pass a YAML path)")
    with open(path, encoding="utf-8") as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of flag names to values")
    recipe = {str(k).replace("-", "_"): v for k, v in recipe.items()}
    recipe["name"] = os.path.splitext(os.path.basename(path))[0]
    return recipe


def recipe_flags(recipe: Mapping) -> dict:
    """The recipe's flag values (recipe-only keys left out)."""
    return {k: v for k, v in recipe.items() if k not in RECIPE_ONLY}
