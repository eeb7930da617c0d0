"""Our 1B pretraining configuration (GPU path) side by side with Bridge's own H100 recipe.

    python bench/bridge_recipe_diff.py                      # builds its own 1B-shaped config dir
    python bench/bridge_recipe_diff.py --hf-model DIR --blend blend.yaml --recipe recipes/x.yaml
    python bench/bridge_recipe_diff.py --json diff.json     # also write the differences as JSON

Builds `speechlm.train.build_config(recipe, 1, gpu=True)` (TE layer spec, fusions, NCCL) and
Bridge's `llama32_1b_pretrain_1gpu_h100_bf16_config()`, whose model provider would read
`meta-llama/Llama-3.2-1B` from the hub: here that one call reads the same local 1B-shaped
config instead, and the recipe runs at our sequence length, so the differences left are choices,
not architecture. Prints every field that differs in `model`, `ddp`, `optimizer` and `env_vars`.
No model is built, nothing is downloaded; runs on CPU. The differences and why: docs/bridge_recipe_diff.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is never asked

SECTIONS = ("model", "ddp", "optimizer", "env_vars")
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "pretrain_llama32_1b.yaml"
# The real Llama-3.2-1B architecture (its config.json), with our 193,792-token vocabulary.
LLAMA32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64)


def write_1b_config_dir(out: Path) -> Path:
    """A 1B-shaped HF config dir (config.json + token_layout.json, no weights): all build_config reads."""
    from transformers import LlamaConfig

    from speechlm.demo import tiny
    from speechlm.token_layout import VOCAB_SIZE, TokenLayout

    out.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=131_072, rms_norm_eps=1e-5,
                rope_parameters={"rope_theta": tiny.LLAMA32_ROPE_THETA, **tiny.LLAMA32_ROPE},
                tie_word_embeddings=True, bos_token_id=tiny.BOS_ID, eos_token_id=tiny.EOS_ID, architectures=["LlamaForCausalLM"],
                dtype="bfloat16", **LLAMA32_1B).save_pretrained(out)
    TokenLayout().save(out)
    return out


def ours(recipe_path: Path, hf_model: Path, blend: Path | None, overrides: list[str]):
    from speechlm.train.run import build_config, load_recipe

    data = [f"speechlm.blend={blend}"] if blend else ["speechlm.blend=null", "dataset.blend=[[unused_prefix],null]"]
    recipe = load_recipe(recipe_path, [f"speechlm.hf_model={hf_model}", "checkpoint.save=/tmp/unused",
                                        "speechlm.from_scratch=true", *data, *overrides])
    return build_config(recipe, 1, gpu=True)[0]


def bridges(hf_model: Path, seq_length: int):
    """Bridge's H100 1B recipe with its hub model read from `hf_model`, at our sequence length."""
    from speechlm.train import megatron_env  # noqa: F401  (CPU mode before any megatron.bridge import)
    from megatron.bridge import AutoBridge  # noqa: I001
    from megatron.bridge.recipes.llama.h100 import llama3 as h100

    class LocalAutoBridge:  # the recipe's only hub access: AutoBridge.from_hf_pretrained("meta-llama/...")
        @staticmethod
        def from_hf_pretrained(_hub_id: str, *args, **kwargs):
            return AutoBridge.from_hf_pretrained(str(hf_model), *args, **kwargs)

    original, h100.AutoBridge = h100.AutoBridge, LocalAutoBridge
    try:
        cfg = h100.llama32_1b_pretrain_1gpu_h100_bf16_config()
    finally:
        h100.AutoBridge = original
    cfg.dataset.seq_length = cfg.model.seq_length = seq_length
    return cfg


def _plain(value):
    """A comparable, printable form: callables and classes by qualified name, dtypes by name."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _fields(section) -> dict:
    if isinstance(section, dict):
        return {str(k): _plain(v) for k, v in section.items()}
    return {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}


def diff(a_cfg, b_cfg, sections=SECTIONS) -> dict[str, dict[str, tuple]]:
    """{section: {field: (ours, bridge's)}} for every field whose values differ."""
    out = {}
    for name in sections:
        a, b = _fields(getattr(a_cfg, name)), _fields(getattr(b_cfg, name))
        out[name] = {k: (a.get(k, "<unset>"), b.get(k, "<unset>")) for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")}
    return out


def _short(value, width: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


def render(differences: dict[str, dict[str, tuple]]) -> str:
    lines = []
    for section, fields in differences.items():
        lines.append(f"## {section}: {len(fields)} field(s) differ")
        if fields:
            w = max(len(k) for k in fields)
            lines.append(f"  {'field':{w}s}  {'ours':40s}  bridge h100")
            for k, (a, b) in fields.items():
                lines.append(f"  {k:{w}s}  {_short(a, 40):40s}  {_short(b)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/bridge_recipe_diff.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", type=Path, default=RECIPE, help="our recipe (default: recipes/pretrain_llama32_1b.yaml)")
    p.add_argument("--hf-model", type=Path, help="a 1B-shaped model/config dir (default: one written to a temp dir)")
    p.add_argument("--blend", type=Path, help="a blend file for the recipe (default: none, dataset.blend stands in)")
    p.add_argument("--json", type=Path, help="also write the differences as JSON here")
    p.add_argument("overrides", nargs="*", help="key=value overrides of our recipe")
    args = p.parse_args(argv)
    if args.hf_model and not (args.hf_model / "config.json").is_file():
        p.error(f"--hf-model {args.hf_model} has no config.json")
    if args.blend and not args.blend.is_file():
        p.error(f"--blend {args.blend} not found")

    from speechlm.train import megatron_env  # noqa: F401  (CPU mode before any megatron.bridge import)
    from speechlm.train.run import RecipeError

    with tempfile.TemporaryDirectory(prefix="bridge-recipe-diff-") as tmp:
        hf_model = args.hf_model or write_1b_config_dir(Path(tmp) / "llama32-1b-shaped")
        try:
            a = ours(args.recipe, hf_model, args.blend, args.overrides)
        except RecipeError as e:
            print(f"bridge_recipe_diff: {e}", file=sys.stderr)
            return 2
        b = bridges(hf_model, a.dataset.seq_length)
    differences = diff(a, b)
    print(f"# ours: {args.recipe.name} (build_config gpu=True)  vs  Bridge: "
          f"llama32_1b_pretrain_1gpu_h100_bf16_config(), both at seq_length {a.dataset.seq_length}")
    print(render(differences))
    if args.json:
        args.json.write_text(json.dumps(differences, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
