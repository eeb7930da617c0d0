"""HF <-> Megatron conversion of the speech-expanded Llama-3 model, through Megatron-Bridge's AutoBridge.

HF -> Megatron (`hf_to_megatron`): a torch_dist checkpoint that `pretrain()`/`finetune()` load as
`checkpoint.pretrained_checkpoint`. Besides Bridge's `iter_0000000/` it carries what the export
needs, so nothing else has to be kept around:

    OUT/latest_checkpointed_iteration.txt, OUT/iter_0000000/...   (Bridge's save_megatron_model)
    OUT/token_layout.json                                         (the layout the weights were made with)
    OUT/hf/{config.json, generation_config.json, tokenizer*.json, token_layout.json}
    OUT/conversion.json                                           (source, TP/PP, vocabulary padding)

Megatron -> HF (`megatron_to_hf`): any iteration of a converted or training checkpoint (a
`checkpoint.save` directory) to an HF model + tokenizer + token_layout.json, vocabulary padding
stripped, generation stopping at <|speech_end|>; its conversion.json names the checkpoint and iteration.

Vocabulary padding: Bridge's converter never pads (its provider has should_pad_vocab=False and
193,792 = 256 x 757 splits evenly at any TP up to 256). Megatron pads only when asked to, i.e.
`should_pad_vocab` (training with `tokenizer.use_tokenizer_vocab_size=true` pads to a multiple of
make_vocab_size_divisible_by x TP: 194,048 rows at TP 4, 194,560 at TP 8). `vocab_divisible_by`
produces such a checkpoint on import (Bridge fills the extra rows with zeros); the export reads the
padded size from the checkpoint's run config and drops the rows past 193,792.

Every function here that builds a Megatron model is collective: under torchrun all ranks call it.
Megatron is imported only inside those functions (after `speechlm.train.megatron_env`, which must come
before any megatron.bridge import): the checks of inputs and token layouts run, and fail, fast.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from speechlm import atomic
from speechlm import token_layout as tl
from speechlm.token_layout import LayoutMismatchError, TokenLayout

HF_SUBDIR = "hf"
SUMMARY_FILE = "conversion.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
_ITER_RE = re.compile(r"^iter_(\d{7})$")
# Files of an HF model directory that describe it without weights: copied into a checkpoint.
_HF_META_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", tl.LAYOUT_FILE)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_EMBED_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# --verify tolerances on the max abs logit difference, Megatron (checkpoint dtype; fp32 compute on
# CPU, TE kernels on a GPU) vs the exported HF model on the same device. fp32: the two
# implementations differ only in operation order (measured ~5e-7 on the tiny model), 1e-4 leaves room for depth and width. bf16: the export
# rounds every weight to bf16 and HF computes in bf16; measured 2.6e-2 at logits of ~4 (tiny model
# trained in fp32) and 1.2e-3 on the bf16 1B-shaped benchmark model; a broken export (wrong, transposed or shifted rows) gives errors of the
# order of the logits themselves, so 0.1 separates the two. Both are scaled by max(1, max |logit|).
VERIFY_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-1}


class ConversionError(ValueError):
    """The input cannot be converted; nothing was written."""


# --- token layout checks ---------------------------------------------------------------------------
def check_hf_dir(hf_dir: str | Path) -> TokenLayout:
    """The layout of an expanded HF model directory, checked against its tokenizer and config.

    Raises LayoutMismatchError naming the layout (hash, file) and what disagrees with it.
    """
    hf_dir = Path(hf_dir)
    if not (hf_dir / tl.LAYOUT_FILE).is_file():
        raise ConversionError(
            f"{hf_dir} has no {tl.LAYOUT_FILE}: not a speech-expanded model "
            "(expand it first: python conversion/expand_vocab.py)"
        )
    layout = TokenLayout.load(hf_dir)
    where = f"token layout {layout.layout_hash} ({hf_dir / tl.LAYOUT_FILE})"
    try:
        state = layout.check_tokenizer(hf_dir)
    except (ValueError, FileNotFoundError) as e:
        raise LayoutMismatchError(f"{where} disagrees with the tokenizer {hf_dir / 'tokenizer.json'}: {e}") from None
    if state != "expanded":
        raise LayoutMismatchError(
            f"{where} disagrees with the tokenizer {hf_dir / 'tokenizer.json'}: it is unexpanded "
            f"({tl.TEXT_VOCAB_SIZE} tokens, no speech tokens)"
        )
    config = _read_json(hf_dir / "config.json")
    if not config.get("architectures"):
        raise ConversionError(f"{hf_dir / 'config.json'} names no architectures (e.g. [\"LlamaForCausalLM\"]): AutoBridge needs it")
    if config.get("vocab_size") != layout.vocab_size:
        raise LayoutMismatchError(
            f"{where} has {layout.vocab_size} tokens but the model config {hf_dir / 'config.json'} has "
            f"vocab_size {config.get('vocab_size')}"
        )
    return layout


def _check_recorded_layout(layout: TokenLayout, layout_path: Path, recorded: Path) -> None:
    """Refuse a checkpoint whose recorded token layout is not `layout` (naming both hashes)."""
    if not recorded.is_file():
        return
    other_dict = json.loads(recorded.read_text())
    other_hash = other_dict.get("layout_hash", "<no hash>")
    if other_hash == layout.layout_hash:
        TokenLayout.load(recorded)  # also verifies that the stored hash matches the content
        return
    ours = layout.to_dict()
    differ = sorted(k for k in set(ours) | set(other_dict) if k != "layout_hash" and ours.get(k) != other_dict.get(k))
    raise LayoutMismatchError(
        f"the checkpoint's token layout {other_hash} ({recorded}) disagrees with the tokenizer/model's token "
        f"layout {layout.layout_hash} ({layout_path})" + (f"; they differ in: {', '.join(differ)}" if differ else "")
    )


# --- helpers ---------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"missing file: {path}")
    return json.loads(path.read_text())


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _megatron_env():
    from speechlm.train import megatron_env  # CPU mode, before any megatron.bridge import

    return megatron_env


def _init_distributed(tp: int, pp: int) -> bool:
    """torch.distributed + Megatron's model-parallel groups; True if this call created them.

    A plain `python` process becomes a world of one; under torchrun the world must be TP x PP
    (a conversion has no use for data parallelism).
    """
    megatron_env = _megatron_env()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    created = False
    if not dist.is_initialized():
        megatron_env.init_single_process_env()
        if not megatron_env.CPU_MODE:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(megatron_env.distributed_backend())
        created = True
    world = dist.get_world_size()
    if world != tp * pp:
        raise ConversionError(
            f"running with {world} processes but TP {tp} x PP {pp} = {tp * pp}: start it with "
            f"`torchrun --nproc-per-node {tp * pp}` (or plain `python` for TP 1, PP 1)"
        )
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(0)
    return created


def _shutdown_distributed(created: bool) -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def _broadcast_path(path: Path | None) -> Path:
    """Rank 0's path on every rank (the temporary output must be the same directory everywhere)."""
    box = [str(path) if path is not None else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _check_output(out: Path, overwrite: bool, forbidden: Path) -> None:
    # Every rank checks (before any collective), so a refusal never leaves other ranks waiting.
    if out == forbidden or forbidden in out.parents:
        raise ConversionError(f"output {out} must not be the input directory or inside it")
    if out.exists() and not overwrite:
        raise ConversionError(f"output {out} exists; pass --overwrite to replace it")


@contextmanager
def _output_dir(out: Path, overwrite: bool, forbidden: Path) -> Iterator[Path]:
    """The hidden sibling to build `out` in, the same directory on every rank: rank 0 owns it
    (atomic_path: renamed onto `out` when the block ends cleanly, removed on an error), the
    other ranks only write into it. Collective when there are several ranks."""
    if _rank() != 0:
        yield _broadcast_path(None)
        return
    _check_output(out, overwrite, forbidden)
    with atomic.atomic_path(out, directory=True) as tmp:
        yield _broadcast_path(tmp)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padded vocabulary: the next multiple of divisible_by x TP."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


# --- HF -> Megatron --------------------------------------------------------------------------------
@dataclass
class ImportSummary:
    output: Path
    layout_hash: str
    tp: int
    pp: int
    vocab_size: int
    padded_vocab_size: int
    tied_embeddings: bool
    params_dtype: str
    seconds: float = 0.0

    def format(self) -> str:
        pad = "none" if self.padded_vocab_size == self.vocab_size else f"{self.padded_vocab_size - self.vocab_size} rows"
        return (
            f"converted HF -> Megatron (torch_dist) in {self.seconds:.1f} s: TP {self.tp}, PP {self.pp}, "
            f"{self.params_dtype}, vocabulary {self.vocab_size} (padding: {pad}), "
            f"{'tied' if self.tied_embeddings else 'untied'} embeddings\n"
            f"  token layout {self.layout_hash}\n  -> {self.output}  (use as checkpoint.pretrained_checkpoint)"
        )


def hf_to_megatron(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    vocab_divisible_by: int | None = None,
    overwrite: bool = False,
) -> ImportSummary:
    """Convert an expanded HF model to a Megatron torch_dist checkpoint (collective under torchrun).

    `vocab_divisible_by` pads the vocabulary to a multiple of it x TP, to match a training run that
    pads (`should_pad_vocab`); by default the vocabulary is not padded, as `speechlm.train` trains.
    """
    t0 = time.perf_counter()
    src, out = Path(input_dir).resolve(), Path(output_dir).resolve()
    if tp < 1 or pp < 1:
        raise ConversionError(f"TP and PP must be >= 1, got TP {tp}, PP {pp}")
    if not src.is_dir():
        raise ConversionError(f"input directory {src} does not exist")
    layout = check_hf_dir(src)
    _check_output(out, overwrite, src)
    config = _read_json(src / "config.json")
    tied = bool(config.get("tie_word_embeddings", False))
    if pp > 1 and tied:
        # prior-art: several bridge/converter bugs with tied embeddings and PP > 1.
        print("warning: PP > 1 with tied embeddings is poorly supported by Megatron-Bridge; prefer TP + DP")

    created = _init_distributed(tp, pp)
    try:
        with _output_dir(out, overwrite, src) as tmp:
            from megatron.bridge import AutoBridge

            dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
            bridge = AutoBridge.from_hf_pretrained(src, torch_dtype=getattr(torch, dtype))
            provider = bridge.to_megatron_provider(load_weights=True)
            _megatron_env().adapt_provider(provider)
            provider.tensor_model_parallel_size = tp
            provider.pipeline_model_parallel_size = pp
            if vocab_divisible_by:
                provider.should_pad_vocab = True
                provider.make_vocab_size_divisible_by = vocab_divisible_by
            if provider.vocab_size != layout.vocab_size:
                raise LayoutMismatchError(f"Bridge built a vocabulary of {provider.vocab_size}, the layout has {layout.vocab_size}")
            if bool(provider.share_embeddings_and_output_weights) != tied:
                raise ConversionError("internal error: Bridge's provider does not keep the embedding tying of the HF model")
            provider.finalize()
            model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
            padded = (padded_vocab_size(layout.vocab_size, provider.make_vocab_size_divisible_by, tp)
                      if provider.should_pad_vocab else layout.vocab_size)
            summary = ImportSummary(out, layout.layout_hash, tp, pp, layout.vocab_size, padded, tied,
                                    str(provider.params_dtype).removeprefix("torch."))
            # The tokenizer is recorded in the run config and saved in iter_0000000/tokenizer by Bridge.
            bridge.save_megatron_model(model, tmp, hf_tokenizer_path=str(src))
            del model
            if _rank() == 0:
                hf = tmp / HF_SUBDIR
                hf.mkdir()
                for name in _HF_META_FILES:
                    if (src / name).is_file():
                        shutil.copyfile(src / name, hf / name)
                summary.seconds = time.perf_counter() - t0
                record = {**asdict(summary), "output": str(out), "source": str(src)}
                (tmp / SUMMARY_FILE).write_text(json.dumps(record, indent=2) + "\n")
                layout.save(tmp)  # the layout the checkpoint's rows follow; export checks it
        if dist.get_world_size() > 1:
            dist.barrier()
        return summary
    finally:
        _shutdown_distributed(created)


# --- Megatron -> HF --------------------------------------------------------------------------------
def list_iterations(ckpt_dir: str | Path) -> list[int]:
    return sorted(int(m.group(1)) for p in Path(ckpt_dir).iterdir() if p.is_dir() and (m := _ITER_RE.match(p.name)))


def resolve_iteration(ckpt_dir: str | Path, iteration: int | None = None) -> tuple[Path, Path, int]:
    """(checkpoint root, iteration directory, iteration) of a `checkpoint.save` directory (or an
    `iter_XXXXXXX` directory itself); the latest by default. An unknown iteration lists the known ones."""
    path = Path(ckpt_dir).resolve()
    if not path.is_dir():
        raise ConversionError(f"checkpoint directory {path} does not exist")
    if m := _ITER_RE.match(path.name):
        if iteration is not None and iteration != int(m.group(1)):
            raise ConversionError(f"{path} is iteration {int(m.group(1))}, not {iteration}")
        return path.parent, path, int(m.group(1))
    available = list_iterations(path)
    if not available:
        raise ConversionError(f"{path} has no iter_XXXXXXX directories: not a Megatron checkpoint directory")
    if iteration is None:
        tracker = path / TRACKER_FILE
        text = tracker.read_text().strip() if tracker.is_file() else ""
        iteration = int(text) if text.isdigit() else available[-1]
    if iteration not in available:
        raise ConversionError(
            f"{path} has no iteration {iteration}; available: {', '.join(map(str, available))}"
        )
    return path, path / f"iter_{iteration:07d}", iteration


def _run_config(iter_dir: Path) -> dict:
    import yaml

    path = iter_dir / "run_config.yaml"
    if not path.is_file():
        raise ConversionError(f"{path} is missing: not a Megatron-Bridge checkpoint")
    return yaml.safe_load(path.read_text()) or {}


def _provenance(iter_dir: Path) -> dict:
    """speechlm.train's provenance.json of a training checkpoint ({} for other checkpoints)."""
    path = iter_dir / "provenance.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def find_hf_source(root: Path, iter_dir: Path, hf_source: str | Path | None = None) -> Path:
    """The HF directory (config, tokenizer, token_layout.json) an export takes its metadata from.

    In order: `hf_source`; the checkpoint's own `hf/` (written by hf_to_megatron); then, from the
    iteration's run config, the pretrained checkpoint it started from (its `hf/`), the model's HF
    id and the tokenizer path, the first that exists and has a token layout.
    """
    if hf_source is not None:
        return Path(hf_source).resolve()
    candidates = [root / HF_SUBDIR]
    run = _run_config(iter_dir)
    pretrained = (run.get("checkpoint") or {}).get("pretrained_checkpoint")
    if pretrained:
        candidates.append(Path(pretrained) / HF_SUBDIR)
    recipe = _provenance(iter_dir).get("recipe") or {}
    for value in ((recipe.get("speechlm") or {}).get("hf_model"), (run.get("model") or {}).get("hf_model_id"),
                  (run.get("tokenizer") or {}).get("tokenizer_model")):
        if value:
            candidates.append(Path(value))
    for c in candidates:
        if (c / "config.json").is_file() and (c / tl.LAYOUT_FILE).is_file():
            return c.resolve()
    raise ConversionError(
        f"found no HF config + tokenizer + {tl.LAYOUT_FILE} for {iter_dir} (looked in: "
        f"{', '.join(map(str, candidates))}); pass --hf-source DIR (the expanded HF model it was trained from)"
    )


def check_checkpoint_layout(root: Path, iter_dir: Path, hf_source: Path) -> TokenLayout:
    """Refuse a checkpoint whose token layout disagrees with the tokenizer or model it is exported with."""
    layout = check_hf_dir(hf_source)
    layout_path = hf_source / tl.LAYOUT_FILE
    run = _run_config(iter_dir)
    recorded = [root / tl.LAYOUT_FILE]
    pretrained = (run.get("checkpoint") or {}).get("pretrained_checkpoint")
    if pretrained:
        recorded.append(Path(pretrained) / tl.LAYOUT_FILE)
    for r in recorded:
        _check_recorded_layout(layout, layout_path, r)
    trained_with = _provenance(iter_dir).get("layout_hash")  # what speechlm.train recorded
    if trained_with and trained_with != layout.layout_hash:
        raise LayoutMismatchError(
            f"the checkpoint was trained with token layout {trained_with} ({iter_dir / 'provenance.json'}), "
            f"but the tokenizer/model's token layout is {layout.layout_hash} ({layout_path})"
        )
    bridge_tokenizer = iter_dir / "tokenizer"  # Bridge's copy of the training tokenizer
    if (bridge_tokenizer / "tokenizer.json").is_file():
        try:
            state = layout.check_tokenizer(bridge_tokenizer)
        except ValueError as e:
            raise LayoutMismatchError(
                f"token layout {layout.layout_hash} ({layout_path}) disagrees with the checkpoint's tokenizer "
                f"{bridge_tokenizer}: {e}"
            ) from None
        if state != "expanded":
            raise LayoutMismatchError(
                f"token layout {layout.layout_hash} ({layout_path}) disagrees with the checkpoint's tokenizer "
                f"{bridge_tokenizer}: it has no speech tokens"
            )
    model_vocab = (run.get("model") or {}).get("vocab_size")
    if model_vocab != layout.vocab_size:
        raise LayoutMismatchError(
            f"token layout {layout.layout_hash} ({layout_path}) has {layout.vocab_size} tokens but the checkpoint's "
            f"model ({iter_dir / 'run_config.yaml'}) has vocab_size {model_vocab}"
        )
    return layout


def load_megatron_for_export(iter_dir: Path):
    """The checkpoint's model on one rank, built with the vocabulary padding it was saved with.

    Bridge's `load_megatron_model` collapses TP to 1, which re-derives the padded vocabulary for TP 1;
    a checkpoint padded for TP 4/8 would then not load. Keeping `make_vocab_size_divisible_by x TP`
    keeps the saved row count.
    """
    _megatron_env()
    from megatron.bridge.training.model_load_save import build_and_load_model, load_model_config

    cfg, _ = load_model_config(str(iter_dir))
    saved_tp = cfg.tensor_model_parallel_size
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, saved_tp) if cfg.should_pad_vocab else cfg.vocab_size
    if cfg.should_pad_vocab:
        cfg.make_vocab_size_divisible_by *= saved_tp
    for name, value in dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1,
                            expert_model_parallel_size=1, expert_tensor_parallel_size=1, sequence_parallel=False,
                            virtual_pipeline_model_parallel_size=None, pipeline_model_parallel_layout=None,
                            num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None,
                            hierarchical_context_parallel_sizes=None, perform_initialization=False).items():
        if hasattr(cfg, name):
            setattr(cfg, name, value)
    # A checkpoint written on a GPU (TE spec) exports on a CPU machine too: the local spec maps its
    # state-dict keys to TE's, so the same checkpoint loads with either.
    _megatron_env().adapt_provider(cfg)
    model = build_and_load_model(str(iter_dir), cfg, use_cpu_init=True, skip_temp_dist_context=True)
    model = model if isinstance(model, list) else [model]
    return model, cfg, padded


@dataclass
class ExportSummary:
    output: Path
    checkpoint: Path
    iteration: int
    layout_hash: str
    dtype: str
    padded_rows_stripped: int
    tied_embeddings: bool
    verify: dict[str, Any] | None = None
    seconds: float = 0.0

    def format(self) -> str:
        lines = [
            f"exported {self.checkpoint} (iteration {self.iteration}) -> HF {self.dtype} in {self.seconds:.1f} s: "
            f"{'tied' if self.tied_embeddings else 'untied'} embeddings, {self.padded_rows_stripped} padded vocabulary rows stripped",
            f"  token layout {self.layout_hash}",
        ]
        if self.verify:
            v = self.verify
            lines.append(
                f"  verify: max abs logit difference {v['max_abs_diff']:.3e} (tolerance {v['tolerance']:.3e} = "
                f"{v['base_tolerance']:g} x max(1, max |logit| {v['max_abs_logit']:.3g})) on {v['tokens']} tokens "
                f"({v['speech_tokens']} speech): {'PASS' if v['passed'] else 'FAIL'}"
            )
        lines.append(f"  -> {self.output}")
        return "\n".join(lines)


def verify_batch(layout: TokenLayout, seq_length: int = 64, batch: int = 2) -> torch.Tensor:
    """A fixed batch of packed documents (TTS, audio-only, text-only) from a fixed seed."""
    import numpy as np

    rng = np.random.default_rng(1234)
    rows = []
    for _ in range(batch):
        ids: list[int] = []
        while len(ids) < seq_length:
            text = rng.integers(1000, 120_000, int(rng.integers(3, 9)))
            codes = rng.integers(0, layout.codec_size, int(rng.integers(6, 16)))
            ids += layout.tts_document(text, codes).tolist() + layout.audio_document(codes[::-1]).tolist()
            ids += layout.text_document(text[::-1]).tolist()
        rows.append(ids[:seq_length])
    return torch.tensor(rows, dtype=torch.long)


def _verify_device() -> torch.device:
    """Where --verify runs both models: this rank's GPU on the GPU path (TE layers), else the CPU."""
    if _megatron_env().CPU_MODE:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def megatron_logits(model, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits of a single-rank Megatron GPT model, as fp32 on the CPU."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
    causal = torch.triu(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=device), 1)[None, None]
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos, attention_mask=causal)
    return out[..., :vocab_size].float().cpu()


def _collect_hf_weights(bridge, model, vocab_size: int, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int]:
    """HF state dict from Bridge's export, vocabulary padding dropped, cast to `dtype`."""
    state: dict[str, torch.Tensor] = {}
    stripped = 0
    for name, weight in bridge.export_hf_weights(model, cpu=True, show_progress=False):
        if name in _EMBED_NAMES and weight.shape[0] != vocab_size:
            if weight.shape[0] < vocab_size:
                raise LayoutMismatchError(f"{name} has {weight.shape[0]} rows, fewer than the layout's {vocab_size} tokens")
            stripped = weight.shape[0] - vocab_size
            weight = weight[:vocab_size]
        state[name] = weight.to(dtype).contiguous()
    return state, stripped


def _build_hf_model(config, state: dict[str, torch.Tensor], tied: bool):
    from transformers import AutoModelForCausalLM

    if tied:
        head = state.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, state["model.embed_tokens.weight"]):
            raise ConversionError("tied embeddings, but Bridge exported an lm_head that differs from embed_tokens")
    with torch.device("meta"):  # no second full copy of the weights
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConversionError(f"exported weights do not fit the HF model: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ConversionError(f"parameters without exported weights: {meta}")
    return model.eval()


def _write_generation_config(src: Path, dst: Path, layout: TokenLayout) -> None:
    """Generation stops at <|speech_end|> (and at end of text); pad has its own id."""
    path = src / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    eos = gen.get("eos_token_id", [])
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    eos = [layout.speech_end_id] + [e for e in eos + [layout.eod_id] if e != layout.speech_end_id]
    gen.update(bos_token_id=layout.bos_id, eos_token_id=list(dict.fromkeys(eos)), pad_token_id=layout.pad_id)
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")


def megatron_to_hf(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    iteration: int | None = None,
    dtype: str = "bf16",
    verify: bool = False,
    hf_source: str | Path | None = None,
    overwrite: bool = False,
) -> ExportSummary:
    """Export one iteration of a Megatron checkpoint to an HF model directory (single process).

    Raises ConversionError for unusable input, LayoutMismatchError when the checkpoint's token
    layout disagrees with the tokenizer or model, VerificationError when --verify fails (the
    output is then not written).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    root, iter_dir, it = resolve_iteration(input_dir, iteration)
    source = find_hf_source(root, iter_dir, hf_source)
    layout = check_checkpoint_layout(root, iter_dir, source)
    out = Path(output_dir).resolve()
    created: bool | None = None
    try:
        with _output_dir(out, overwrite, root) as tmp:
            created = _init_distributed(1, 1)
            from megatron.bridge import AutoBridge

            model, cfg, padded = load_megatron_for_export(iter_dir)
            config = AutoConfig.from_pretrained(source)
            config.vocab_size = layout.vocab_size
            config.dtype = torch_dtype
            tied = bool(config.tie_word_embeddings)
            if bool(cfg.share_embeddings_and_output_weights) != tied:
                raise ConversionError(
                    f"the checkpoint has {'tied' if cfg.share_embeddings_and_output_weights else 'untied'} embeddings, "
                    f"the HF config {source / 'config.json'} says tie_word_embeddings={tied}"
                )
            bridge = AutoBridge.from_hf_config(config)
            state, stripped = _collect_hf_weights(bridge, model, layout.vocab_size, torch_dtype)
            if stripped != padded - layout.vocab_size:
                raise ConversionError(f"expected {padded - layout.vocab_size} padded rows, found {stripped}")
            hf = _build_hf_model(config, state, tied)
            del state
            hf.save_pretrained(tmp)
            del hf
            _write_generation_config(source, tmp, layout)
            for p in source.iterdir():  # tokenizer files, README, LICENSE...; not weights or configs we wrote
                if (p.is_file() and not (tmp / p.name).exists() and p.name != tl.LAYOUT_FILE
                        and not p.name.endswith(_WEIGHT_SUFFIXES) and not p.name.endswith(".index.json")):
                    shutil.copyfile(p, tmp / p.name)
            summary = ExportSummary(out, root, it, layout.layout_hash, dtype, stripped, tied)
            if verify:
                # On a GPU machine the model has TE layers, which do not run on the CPU it was loaded on.
                device = _verify_device()
                ids = verify_batch(layout)
                ref = megatron_logits(model[0].to(device).eval(), ids, layout.vocab_size)
                del model  # not needed past here: frees its (GPU) memory for the HF model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                exported = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype).to(device).eval()
                with torch.no_grad():
                    got = exported(ids.to(device)).logits.float().cpu()
                del exported
                scale = max(1.0, ref.abs().max().item())
                diff = (got - ref).abs().max().item()
                summary.verify = dict(
                    max_abs_diff=diff, max_abs_logit=ref.abs().max().item(), base_tolerance=VERIFY_TOLERANCE[dtype],
                    tolerance=VERIFY_TOLERANCE[dtype] * scale, tokens=ids.numel(),
                    speech_tokens=int(tl.is_speech(ids.numpy()).sum()), passed=diff <= VERIFY_TOLERANCE[dtype] * scale,
                )
                if not summary.verify["passed"]:
                    raise VerificationError(summary.format())
            if not layout.check_tokenizer(tmp) == "expanded":
                raise ConversionError("internal error: the exported tokenizer does not check as expanded")
            # What the export came from (speechlm.evaluate reads the training step of an HF model here).
            (tmp / SUMMARY_FILE).write_text(json.dumps(
                {"checkpoint": str(root), "iteration": it, "dtype": dtype, "layout_hash": layout.layout_hash,
                 "verify": summary.verify}, indent=2) + "\n")
            layout.save(tmp)  # last: its presence marks a finished export
            summary.seconds = time.perf_counter() - t0
        return summary
    finally:
        if created is not None:
            _shutdown_distributed(created)


class VerificationError(RuntimeError):
    """--verify found the exported model's logits too far from Megatron's."""
