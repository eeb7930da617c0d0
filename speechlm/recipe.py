"""Recipe files: YAML with an optional `base:` recipe merged first, plus key=value overrides.

Kept apart from speechlm.train (no Megatron import) so tools can read a recipe cheaply.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class RecipeError(ValueError):
    """A recipe that cannot work; the message says what to change."""


def load_recipe(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """The recipe (its `base` chain merged first) with `key=value` overrides applied."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    recipe = OmegaConf.load(path)
    base = recipe.pop("base", None)
    if base:
        recipe = OmegaConf.merge(load_recipe(path.parent / base), recipe)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise RecipeError(f"overrides must look like key=value, got: {' '.join(bad)}")
    return OmegaConf.merge(recipe, OmegaConf.from_dotlist(list(overrides)))
