"""Expand a Hugging Face Llama-3 checkpoint to the speech vocabulary of `token_layout`.

Works on the files, not on a loaded model: the tokenizer JSON files are edited directly (one
pass instead of 65,536 `add_tokens` calls) and only the safetensors shards holding the
embedding / LM head are rewritten; every other tensor and shard is copied byte for byte.

New rows (the 65,536 codec tokens and the reserved rows our specials re-use) are drawn from the
multivariate normal with the mean and covariance of the trained rows (ids 0..128001: the BPE
vocabulary plus BOS/EOD; the reserved ids 128002..128255 were never trained and are excluded).
Statistics are computed in float64 and samples cast back to the model dtype.
We do not use `resize_token_embeddings(mean_resizing=True)`: it samples with 1e-9 x covariance,
so every new row is the mean (transformers PR #33325; axolotl PR #2000).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speechlm import atomic
from speechlm import token_layout as tl
from speechlm.token_layout import TokenLayout

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
NEW_ROW_IDS = np.concatenate([np.array(sorted(tl.SPECIAL_IDS)), np.arange(tl.CODEC_OFFSET, tl.VOCAB_SIZE)])
_CHUNK = 8192  # rows per float64 block: bounds the extra memory to ~130 MB at hidden 2048


class ExpansionError(ValueError):
    """The input cannot be expanded (or the output cannot be written); nothing was written."""


@dataclass
class MatrixStats:
    name: str
    trained_rows: int
    mean_norm: float
    cov_trace: float
    sampled_mean_norm: float = 0.0
    sampled_cov_trace: float = 0.0


@dataclass
class ExpansionSummary:
    output: Path
    layout_hash: str
    tied: bool
    dtype: str
    hidden_size: int
    rows_added: int = tl.CODEC_SIZE
    rows_reinitialised: int = len(tl.SPECIAL_IDS)
    init_scale: float = 1.0
    seed: int = 0
    matrices: list[MatrixStats] = field(default_factory=list)
    seconds: float = 0.0

    def format(self) -> str:
        lines = [
            f"expanded vocabulary {tl.TEXT_VOCAB_SIZE} -> {tl.VOCAB_SIZE} rows ({self.dtype}, hidden {self.hidden_size}, "
            f"{'tied' if self.tied else 'untied'} embeddings) in {self.seconds:.1f} s",
            f"  rows added: {self.rows_added} codec tokens; reserved rows re-initialised for specials: {self.rows_reinitialised}",
            f"  init: N(mean, {self.init_scale} x cov of the {self.matrices[0].trained_rows} trained rows), seed {self.seed}",
        ]
        for m in self.matrices:
            lines.append(
                f"  {m.name}: mean norm {m.mean_norm:.6g} -> sampled {m.sampled_mean_norm:.6g}; "
                f"cov trace {m.cov_trace:.6g} (x scale {m.cov_trace * self.init_scale:.6g}) -> sampled {m.sampled_cov_trace:.6g}"
            )
        lines.append(f"  token layout {self.layout_hash} -> {self.output / tl.LAYOUT_FILE}")
        return "\n".join(lines)


# --- statistics and sampling -----------------------------------------------------------------
def _rows_f64(weight, start: int, stop: int) -> np.ndarray:
    import torch

    return weight[start:stop].to(torch.float64).numpy()


def row_statistics(weight, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of rows 0..n_rows-1 of a torch matrix, in float64, by blocks."""
    # One pass over data shifted by the first block's mean: as accurate as a centred two-pass
    # computation (the correction term is |mean - shift|^2, tiny) at half the reading.
    shift = _rows_f64(weight, 0, min(_CHUNK, n_rows)).mean(0)
    d = weight.shape[1]
    total, prod = np.zeros(d), np.zeros((d, d))
    for a in range(0, n_rows, _CHUNK):
        x = _rows_f64(weight, a, min(a + _CHUNK, n_rows)) - shift
        total += x.sum(0)
        prod += x.T @ x
    delta = total / n_rows
    cov = (prod - n_rows * np.outer(delta, delta)) / (n_rows - 1)
    return shift + delta, cov


def _factor(cov: np.ndarray) -> np.ndarray:
    """A with A @ A.T == cov: Cholesky, or a symmetric square root when cov is only semi-definite."""
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(cov)
        return v * np.sqrt(np.clip(w, 0.0, None))


def expand_matrix(weight, name: str, rng: np.random.Generator, init_scale: float):
    """(193792 x d matrix, stats): old rows copied, NEW_ROW_IDS drawn from N(mean, scale x cov)."""
    import torch

    n_trained = len(tl.TRAINED_TEXT_IDS)
    mean, cov = row_statistics(weight, n_trained)
    stats = MatrixStats(name, n_trained, float(np.linalg.norm(mean)), float(np.trace(cov)))
    factor = _factor(cov * init_scale)
    out = torch.empty((tl.VOCAB_SIZE, weight.shape[1]), dtype=weight.dtype)
    out[: tl.TEXT_VOCAB_SIZE] = weight
    total, total_sq = np.zeros_like(mean), np.zeros_like(mean)
    for a in range(0, len(NEW_ROW_IDS), _CHUNK):
        ids = torch.from_numpy(NEW_ROW_IDS[a : a + _CHUNK])
        z = rng.standard_normal((len(ids), len(mean)))
        rows = torch.from_numpy(mean + z @ factor.T).to(weight.dtype)
        out[ids] = rows
        r = rows.to(torch.float64).numpy()  # statistics of what was stored, after the cast
        total += r.sum(0)
        total_sq += (r * r).sum(0)
    n = len(NEW_ROW_IDS)
    s_mean = total / n
    stats.sampled_mean_norm = float(np.linalg.norm(s_mean))
    stats.sampled_cov_trace = float(((total_sq - n * s_mean**2) / (n - 1)).sum())
    return out, stats


# --- input checks ----------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ExpansionError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExpansionError(f"{path} is not valid JSON: {e}") from None


def _weight_files(src: Path) -> tuple[list[str], dict | None]:
    """Shard file names and the index (None for a single model.safetensors)."""
    if (src / "model.safetensors.index.json").is_file():
        index = _read_json(src / "model.safetensors.index.json")
        shards = sorted(set(index["weight_map"].values()))
        for s in shards:
            if not (src / s).is_file():
                raise ExpansionError(f"missing file: {src / s} (listed in model.safetensors.index.json)")
        return shards, index
    if (src / "model.safetensors").is_file():
        return ["model.safetensors"], None
    if any(src.glob("*.bin")):
        raise ExpansionError(f"{src} has PyTorch .bin weights; save the model with safetensors first")
    raise ExpansionError(f"missing file: {src / 'model.safetensors'} (no safetensors weights in {src})")


def check_input(src: Path) -> dict:
    """Refuse anything that is not an unexpanded Llama-3 HF checkpoint; returns its config."""
    if not src.is_dir():
        raise ExpansionError(f"input directory {src} does not exist")
    if (src / tl.LAYOUT_FILE).exists():
        raise ExpansionError(f"{src} is already expanded: it has {tl.LAYOUT_FILE}")
    config = _read_json(src / "config.json")
    _read_json(src / "tokenizer_config.json")
    if not (src / "tokenizer.json").is_file():
        raise ExpansionError(f"missing file: {src / 'tokenizer.json'}")
    vocab = config.get("vocab_size")
    if vocab == tl.VOCAB_SIZE:
        raise ExpansionError(f"{src} is already expanded: config.json has vocab_size {vocab}")
    if vocab != tl.TEXT_VOCAB_SIZE:
        raise ExpansionError(f"{src}: vocab_size {vocab} is not Llama-3's {tl.TEXT_VOCAB_SIZE}")
    try:
        state = TokenLayout().check_tokenizer(src)
    except ValueError as e:
        raise ExpansionError(f"{src}: not an unexpanded Llama-3 tokenizer: {e}") from None
    if state != "unexpanded":
        raise ExpansionError(f"{src} is already expanded: its tokenizer has the speech tokens")
    _weight_files(src)
    return config


# --- writers ---------------------------------------------------------------------------------
def _token_entry(content: str, special: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": special}


def write_tokenizer(src: Path, dst: Path, layout: TokenLayout) -> None:
    """Rename the reserved tokens to our specials and append <|s_c|> at 128256 + c."""
    tok = json.loads((src / "tokenizer.json").read_text())
    names = {i: n for n, i in layout.specials.items()}
    for e in tok["added_tokens"]:
        e["content"] = names.get(e["id"], e["content"])
    # Codec tokens are not "special", so decode(skip_special_tokens=True) keeps the speech.
    tok["added_tokens"] += [
        {"id": tl.CODEC_OFFSET + c, **_token_entry(tl.codec_token(c), False)} for c in range(tl.CODEC_SIZE)
    ]
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))

    # tokenizer_config's added_tokens_decoder gets the renamed specials only: the fast tokenizer
    # takes the codec tokens from tokenizer.json, and listing 65,536 more here doubles load time.
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    for key, e in cfg.get("added_tokens_decoder", {}).items():
        e["content"] = names.get(int(key), e["content"])
    cfg["pad_token"] = "<|pad|>"
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")
    if (src / "special_tokens_map.json").is_file():
        smap = json.loads((src / "special_tokens_map.json").read_text())
        smap["pad_token"] = "<|pad|>"
        (dst / "special_tokens_map.json").write_text(json.dumps(smap, ensure_ascii=False, indent=2) + "\n")


def write_configs(src: Path, dst: Path, config: dict, layout: TokenLayout) -> None:
    config = {**config, "vocab_size": tl.VOCAB_SIZE, "pad_token_id": layout.pad_id}  # bos/eos kept
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen_path = src / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    gen.update(bos_token_id=tl.BOS_ID, eos_token_id=[layout.speech_end_id, tl.EOD_ID], pad_token_id=layout.pad_id)
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")


def write_weights(src: Path, dst: Path, tied: bool, rng: np.random.Generator, init_scale: float) -> tuple[list[MatrixStats], str, int]:
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards, index = _weight_files(src)
    targets = [EMBED] if tied else [EMBED, LM_HEAD]
    found: dict[str, str] = {}
    for s in shards:
        with safe_open(src / s, framework="pt") as f:
            for k in f.keys():
                if k in (EMBED, LM_HEAD):
                    found[k] = s
    for k in targets:
        if k not in found:
            raise ExpansionError(f"{src}: no tensor {k} in the weights ({'tied' if tied else 'untied'} embeddings)")

    stats: list[MatrixStats] = []
    added_bytes, dtype, hidden = 0, "", 0
    new: dict[str, object] = {}
    for s in shards:
        if s not in found.values():
            shutil.copyfile(src / s, dst / s)
            continue
        with safe_open(src / s, framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for k in targets:
            if found[k] != s:
                continue
            w = tensors[k]
            if tuple(w.shape) != (tl.TEXT_VOCAB_SIZE, w.shape[1]):
                raise ExpansionError(f"{src}: {k} has shape {tuple(w.shape)}, expected ({tl.TEXT_VOCAB_SIZE}, hidden)")
            new[k], st = expand_matrix(w, k, rng, init_scale)
            stats.append(st)
            added_bytes += (new[k].numel() - w.numel()) * w.element_size()
            dtype, hidden = str(w.dtype).removeprefix("torch."), w.shape[1]
        if tied and LM_HEAD in tensors:  # a checkpoint that stores the tied head too: keep them one matrix
            added_bytes += (new[EMBED].numel() - tensors[LM_HEAD].numel()) * tensors[LM_HEAD].element_size()
            tensors[LM_HEAD] = new[EMBED].clone()  # safetensors refuses shared storage
        tensors.update({k: v for k, v in new.items() if k in tensors})
        save_file(tensors, dst / s, metadata=metadata)
        del tensors
    if index is not None:
        index.setdefault("metadata", {})
        if "total_size" in index["metadata"]:
            index["metadata"]["total_size"] = int(index["metadata"]["total_size"]) + added_bytes
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return stats, dtype, hidden


_OWN_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "model.safetensors.index.json"}


def expand_vocab(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    init_scale: float = 1.0,
    seed: int = 0,
    language_tags: bool = False,
    overwrite: bool = False,
) -> ExpansionSummary:
    """Expand an HF Llama-3 checkpoint; the output appears only once it is complete."""
    t0 = time.perf_counter()
    src, out = Path(input_dir).resolve(), Path(output_dir).resolve()
    if not init_scale > 0:
        raise ExpansionError(f"init scale must be > 0, got {init_scale}")
    config = check_input(src)
    if out == src or src in out.parents:
        raise ExpansionError(f"output {out} must not be the input directory or inside it")
    if out.exists() and not overwrite:
        raise ExpansionError(f"output {out} exists; pass --overwrite (overwrite=True) to replace it")

    layout = TokenLayout(language_tags=language_tags)
    tied = bool(config.get("tie_word_embeddings", False))  # LlamaConfig's default is untied
    # Build in a hidden sibling and rename at the end: a crash never leaves `out` half-written.
    with atomic.atomic_path(out, directory=True) as tmp:
        rng = np.random.default_rng(seed)
        stats, dtype, hidden = write_weights(src, tmp, tied, rng, init_scale)
        write_tokenizer(src, tmp, layout)
        write_configs(src, tmp, config, layout)
        for p in src.iterdir():  # README, LICENSE, ...: carried over unchanged
            if p.is_file() and not (tmp / p.name).exists() and p.name not in _OWN_FILES:
                shutil.copyfile(p, tmp / p.name)
        if layout.check_tokenizer(tmp) != "expanded":
            raise ExpansionError("internal error: the written tokenizer does not check as expanded")
        layout.save(tmp)  # last: its presence marks a finished expansion
    return ExpansionSummary(
        output=out, layout_hash=layout.layout_hash, tied=tied, dtype=dtype, hidden_size=hidden,
        init_scale=init_scale, seed=seed, matrices=stats, seconds=time.perf_counter() - t0,
    )
