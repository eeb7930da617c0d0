"""SFT mode of speechlm.train (`speechlm.mode: sft`): text-to-speech fine-tuning on packed pairs.

What differs from pretraining, applied to the Bridge ConfigContainer that speechlm.train builds:
- data: only TTS pairs (the blend file's datasets of kind `tts`, or `dataset.blend`), packed by
  `speechlm.data.sft_packing` with the loss on the speech of each pair and attention within each pair;
- loss: averaged over the loss tokens of the whole global batch (`model.calculate_per_token_loss`),
  not per micro-batch, so rows with few speech tokens are not over-weighted;
- init: a pretraining checkpoint (Bridge's `finetune()` refuses to start without one);
- LR: a warning when the peak is not the pretraining run's final LR.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from speechlm.train import megatron_env  # CPU mode before any megatron.bridge import

import yaml  # noqa: E402
from megatron.bridge.data.base import DatasetBuildContext, DatasetProvider  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from speechlm.data import blend_file  # noqa: E402
from speechlm.data.sft_packing import PackedTTSDataset  # noqa: E402
from speechlm.train import checkpoints  # noqa: E402
from speechlm.token_layout import LayoutMismatchError, TokenLayout  # noqa: E402
from speechlm.train.validation import PerSetValidation  # noqa: E402

KIND = "tts"
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@dataclass(kw_only=True)
class PackedTTSDatasetConfig(DatasetProvider):
    """Bridge dataset provider (`cfg.dataset`) for packed TTS pairs; speechlm.train builds it."""

    seq_length: int
    train_prefixes: list[str]
    valid_prefixes: list[str] = field(default_factory=list)
    layout_dir: str | None = None  # the model directory holding token_layout.json
    random_seed: int = 1234
    # Where the packing is cached (the recipe's dataset.path_to_cache); None: cache/ beside the
    # first prefix. Global rank 0 writes it, every rank reads it: a filesystem all nodes share.
    path_to_cache: str | None = None
    # None: THD packed sequences when a GPU (TransformerEngine) is present, else attention masks.
    packed_thd: bool | None = None
    dataloader_type: str | None = "single"
    # Read by Bridge's get_batch: the CPU form passes the block-diagonal mask, the THD form none.
    skip_getting_attention_mask_from_dataset: bool = True

    def finalize(self) -> None:
        super().finalize()
        if self.packed_thd is None:
            self.packed_thd = megatron_env.uses_te()  # THD attention is TE's
        self.skip_getting_attention_mask_from_dataset = bool(self.packed_thd)

    def layout(self) -> TokenLayout:
        return TokenLayout.load(self.layout_dir) if self.layout_dir and (Path(self.layout_dir) / "token_layout.json").is_file() \
            else TokenLayout()

    def dataset(self, prefixes: list[str], num_samples: int, name: str) -> PackedTTSDataset:
        thd = self.packed_thd if self.packed_thd is not None else False
        return PackedTTSDataset(prefixes, self.seq_length, num_samples, self.random_seed, self.layout(), thd, name,
                                path_to_cache=self.path_to_cache)

    def build_datasets(self, context: DatasetBuildContext):
        from megatron.bridge.utils.common_utils import print_rank_0

        train = self.dataset(self.train_prefixes, context.train_samples, "train")
        valid = self.dataset(self.valid_prefixes, context.valid_samples, "valid") if self.valid_prefixes else None
        for ds in (train, valid):
            if ds is not None:
                print_rank_0(f"> packed TTS {ds.name}: {ds.pairs:,} pairs -> {len(ds):,} rows of {self.seq_length + 1} "
                             f"over {ds.epochs} epoch(s), {100 * ds.fill:.1f} % filled; {ds.dropped} pairs too long")
        return train, valid, None


# --- recipe -> config ---------------------------------------------------------------------------


def select_data(cfg, ours: dict, hf_model: str):
    """Point `cfg.dataset.blend` at the TTS train prefixes (so speechlm.train's checks apply as in
    pretraining); returns the blend file (or None when the recipe states dataset.blend itself)."""
    if not ours.get("blend"):
        return None
    blend = blend_file.load(ours["blend"])
    TokenLayout.load(hf_model).check_compatible(blend.layout_hash, f"blend {blend.path} vs model {hf_model}")
    train = [row["prefix"] for row in blend.datasets if row.get("kind") == KIND]
    if not train:
        raise blend_file.BlendError(f"{blend.path} lists no dataset of kind {KIND}: SFT trains on TTS pairs only")
    cfg.dataset.blend, cfg.dataset.split, cfg.dataset.blend_per_split = (train, None), None, None
    return blend


def validation_sets(blend) -> dict[str, str]:
    """The held-out TTS sets by name (`tts/<lang>`)."""
    return {k: v for k, v in (blend.validation if blend else {}).items() if k.split("/")[0] == KIND}


def finish_config(cfg, ours: dict, hf_model: str, blend) -> tuple[list[str], list[str]]:
    """Swap in the packed dataset and check SFT's own constraints: (problems, warnings)."""
    problems = []
    prefixes = list(cfg.dataset.blend[0]) if cfg.dataset.blend else []
    if cfg.dataset.blend and cfg.dataset.blend[1] and len(set(cfg.dataset.blend[1])) > 1:
        # Every pair is seen once per epoch; weights between TTS sets would need sampling.
        problems.append("SFT packs every TTS pair once per epoch: dataset.blend weights are not supported")
    packed_thd = ours.get("packed_thd")
    packed_thd = megatron_env.uses_te() if packed_thd is None else bool(packed_thd)
    old = cfg.dataset
    cfg.dataset = PackedTTSDatasetConfig(
        seq_length=old.seq_length, train_prefixes=prefixes, valid_prefixes=list(validation_sets(blend).values()),
        layout_dir=str(hf_model), random_seed=old.random_seed, packed_thd=packed_thd, path_to_cache=old.path_to_cache,
        num_workers=old.num_workers, data_sharding=old.data_sharding, pin_memory=old.pin_memory,
        persistent_workers=old.persistent_workers,
    )
    if not cfg.model.calculate_per_token_loss or cfg.ddp.average_in_collective:
        problems.append("SFT averages the loss over the global batch's loss tokens: set "
                        "model.calculate_per_token_loss=true and ddp.average_in_collective=false")
    if cfg.model.context_parallel_size != 1:
        problems.append("SFT packing supports context_parallel_size=1 only")
    if packed_thd and cfg.train.micro_batch_size != 1:
        problems.append("packed THD sequences take one row per micro-batch: set train.micro_batch_size=1")
    if not cfg.checkpoint.pretrained_checkpoint:
        problems.append("SFT starts from a pretraining checkpoint: set checkpoint.pretrained_checkpoint "
                        "(a pretraining save directory, one of its iter_* directories, or an HF model directory)")
    else:
        problems += pretraining_layout_problems(cfg.checkpoint.pretrained_checkpoint, hf_model)
    return problems, [w for w in [lr_warning(cfg, ours)] if w]


def pretraining_layout_problems(pretrained_checkpoint: str, hf_model: str) -> list[str]:
    """A pretraining checkpoint's token layout (`layout_hash` in its provenance.json) must be the
    model's: its rows mean those token ids. (A converted model's token_layout.json is checked by
    speechlm.train for both modes.)"""
    it = _iteration_dir(Path(pretrained_checkpoint))
    provenance = it / "provenance.json" if it is not None else None
    if provenance is None or not provenance.is_file() or not (Path(hf_model) / "token_layout.json").is_file():
        return []
    recorded = json.loads(provenance.read_text()).get("layout_hash")
    if not recorded:
        return []
    try:
        TokenLayout.load(hf_model).check_compatible(recorded, f"pretrained checkpoint {it} ({provenance.name})")
    except LayoutMismatchError as e:
        return [f"{e} (model {hf_model})"]
    return []


# --- the pretraining run's final LR --------------------------------------------------------------


def _iteration_dir(path: Path) -> Path | None:
    """`path` itself when it is one iteration's directory, else the iteration its tracker names."""
    if (path / "provenance.json").is_file() or (path / "run_config.yaml").is_file():
        return path
    iteration = checkpoints.tracked_iteration(path)
    it = checkpoints.iteration_dir(path, iteration) if iteration is not None else None
    return it if it is not None and it.is_dir() else None


def pretraining_final_lr(pretrained_checkpoint: str | None, pretrain_recipe: str | None) -> tuple[float, str] | None:
    """(final LR, where it was read) of the pretraining run: the checkpoint's provenance.json or
    Bridge's run_config.yaml, else the pretraining recipe. With cosine decay the final LR is min_lr."""
    it = _iteration_dir(Path(pretrained_checkpoint)) if pretrained_checkpoint else None
    if it is not None and (it / "provenance.json").is_file():
        recipe = json.loads((it / "provenance.json").read_text()).get("recipe") or {}
        lr = (recipe.get("optimizer") or {}).get("min_lr")
        if lr is not None:
            return float(lr), str(it / "provenance.json")
    if it is not None and (it / "run_config.yaml").is_file():
        lr = ((yaml.safe_load((it / "run_config.yaml").read_text()) or {}).get("optimizer") or {}).get("min_lr")
        if lr is not None:
            return float(lr), str(it / "run_config.yaml")
    if pretrain_recipe:
        from speechlm.train.recipe import load_recipe

        path = Path(pretrain_recipe)
        path = path if path.is_absolute() or path.is_file() else RECIPES / path
        lr = OmegaConf.select(load_recipe(path), "optimizer.min_lr")
        if lr is not None:
            return float(lr), str(path)
    return None


def lr_warning(cfg, ours: dict) -> str | None:
    found = pretraining_final_lr(cfg.checkpoint.pretrained_checkpoint, ours.get("pretrain_recipe"))
    if found is None:
        return "SFT: cannot tell the pretraining run's final LR (no provenance.json/run_config.yaml, no speechlm.pretrain_recipe)"
    final, source = found
    peak = float(cfg.optimizer.lr)
    if not math.isclose(peak, final, rel_tol=1e-6):
        return (f"SFT peak LR optimizer.lr={peak:g} differs from the pretraining run's final LR {final:g} "
                f"(from {source}); the default is to continue at the pretraining run's final LR")
    return None


def warn(messages: list[str]) -> None:
    if os.environ.get("RANK", "0") == "0":
        for m in messages:
            print(f"WARNING: {m}", file=sys.stderr, flush=True)


# --- per-set validation on packed pairs ----------------------------------------------------------


class PackedPerSetValidation(PerSetValidation):
    """speechlm.train.validation's per-set callback, each set read as packed TTS pairs."""

    def _dataset(self, cfg, name: str, prefix: str, n_samples: int) -> PackedTTSDataset:
        return cfg.dataset.dataset([prefix], n_samples, name)


def callbacks(blend, forward_step) -> list:
    sets = validation_sets(blend)
    return [PackedPerSetValidation(sets, forward_step)] if sets else []


def describe(cfg) -> str:
    ds = cfg.dataset
    return (f"SFT data: {len(ds.train_prefixes)} TTS train prefix(es), {len(ds.valid_prefixes)} held-out; "
            f"rows of {ds.seq_length + 1} tokens, loss on speech only")

