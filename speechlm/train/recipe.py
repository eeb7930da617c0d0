"""Recipe files: YAML with an optional `base:` recipe merged first, plus key=value overrides.

Kept apart from speechlm.train (no Megatron import) so tools can read a recipe cheaply.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class RecipeError(ValueError):
    """A recipe that cannot work; the message says what to change."""


# The keys of a recipe's `speechlm` section (speechlm.train refuses any other).
OUR_KEYS = (
    "mode",                 # pretrain | sft
    "hf_model",             # model directory: HF config + tokenizer + token_layout.json
    "blend",                # blend file written by data_prep/plan_mix.py
    "from_scratch",         # true: pretraining may start from random weights
    "train_tokens",         # run length in tokens (decides train.train_iters)
    "warmup_fraction",      # LR warm-up as a fraction of the run
    "checkpoint_schedule",  # [[until iteration, save every], ...]
    "keep_last",            # checkpoints kept, plus pinned ones
    "pinned",               # iterations never deleted
    "peak_tflops_per_gpu",  # for MFU
    "pretrain_recipe",      # SFT: the pretraining recipe, for its final LR
    "packed_thd",           # SFT: THD packed sequences (null: on GPU)
)


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
