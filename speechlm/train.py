"""Training entry point: a recipe YAML (+ key=value overrides) -> Bridge ConfigContainer -> pretrain().

    torchrun --nproc-per-node N -m speechlm.train --config recipes/smoke.yaml [key=value ...]

A recipe has two kinds of top-level keys: Bridge's own ConfigContainer sections (`train`,
`optimizer`, `scheduler`, `dataset`, `checkpoint`, `logger`, `model`, `ddp`, ...), merged onto
Bridge's `_pretrain_common()` defaults exactly as Bridge's own YAML overrides are, and one
`speechlm` section for what Bridge has no field for (where the model comes from).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speechlm import megatron_env

import torch  # noqa: E402  (after the CPU mode)
from omegaconf import DictConfig, OmegaConf  # noqa: E402

OUR_SECTION = "speechlm"


def load_recipe(path: str | Path, overrides: list[str]) -> DictConfig:
    """The recipe file with `key=value` overrides applied (OmegaConf dotlist syntax)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"recipe not found: {path}")
    recipe = OmegaConf.load(path)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"overrides must look like key=value, got: {' '.join(bad)}")
    return OmegaConf.merge(recipe, OmegaConf.from_dotlist(overrides))


def build_config(recipe: DictConfig):
    """A Bridge ConfigContainer: Bridge's pretraining defaults, then the recipe on top."""
    from megatron.bridge import AutoBridge
    from megatron.bridge.recipes.common import _pretrain_common
    from megatron.bridge.training.utils.omegaconf_utils import apply_overrides, create_omegaconf_dict_config

    ours = recipe.get(OUR_SECTION) or {}
    hf_model = ours.get("hf_model")
    if not hf_model or not Path(hf_model).is_dir():
        raise SystemExit(f"{OUR_SECTION}.hf_model must name an HF model directory (got {hf_model!r})")

    cfg = _pretrain_common()
    # The architecture comes from the HF config; weights from checkpoint.pretrained_checkpoint
    # (a converted model) or checkpoint.load (resume).
    cfg.model = AutoBridge.from_hf_pretrained(hf_model).to_megatron_provider(load_weights=False)
    megatron_env.adapt_provider(cfg.model)
    cfg.tokenizer.tokenizer_model = str(hf_model)
    # Keep the model's vocabulary (193,792 after expansion) instead of re-deriving it from the
    # tokenizer: Bridge would otherwise re-pad it.
    cfg.tokenizer.use_tokenizer_vocab_size = False
    cfg.dist.distributed_backend = megatron_env.distributed_backend()

    bridge_sections = OmegaConf.masked_copy(recipe, [k for k in recipe if k != OUR_SECTION])
    merged, excluded = create_omegaconf_dict_config(cfg)
    merged = OmegaConf.merge(merged, bridge_sections)
    apply_overrides(cfg, OmegaConf.to_container(merged, resolve=True), excluded)
    _align_derived_fields(cfg)
    return cfg


def _align_derived_fields(cfg) -> None:
    """Fields Bridge keeps in two places; the recipe states each once."""
    cfg.model.seq_length = cfg.dataset.seq_length
    if cfg.mixed_precision is None:
        cfg.model.params_dtype = torch.float32
        cfg.model.bf16 = cfg.model.fp16 = False
        cfg.optimizer.bf16 = cfg.optimizer.fp16 = False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m speechlm.train",
        description="Pretrain with Megatron-Bridge from a recipe YAML. Run under torchrun (or srun).",
        epilog="Overrides use the recipe's keys, e.g. train.train_iters=100 optimizer.lr=1e-4.",
    )
    parser.add_argument("--config", required=True, help="recipe YAML (recipes/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied on top of the recipe")
    args = parser.parse_args(argv)

    megatron_env.init_single_process_env()
    cfg = build_config(load_recipe(args.config, args.overrides))

    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    pretrain(cfg, forward_step)


if __name__ == "__main__":
    main(sys.argv[1:])
