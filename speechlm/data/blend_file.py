"""The blend file: what `data_prep/plan_mix.py` writes and the training recipes read.

    version: 1
    layout_hash: <token layout every dataset was built with>
    planned_tokens: <int>
    train: {prefixes: [...], weights: [...]}          # Megatron blend, weights sum to 1
    validation: {audio/hi: <prefix>, tts/hi: ..., text/sangraha/hi: ...}   # each evaluated alone
    manifests: {<manifest path>: <sha256>}
    datasets: [{name, kind, language, prefix, tokens, natural_share, planned_share, epochs, hours}, ...]
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from speechlm import atomic

VERSION = 1


class BlendError(ValueError):
    pass


@dataclass
class Blend:
    layout_hash: str
    train_prefixes: list[str]
    train_weights: list[float]
    validation: dict[str, str]
    planned_tokens: int = 0
    manifests: dict[str, str] = field(default_factory=dict)
    datasets: list[dict] = field(default_factory=list)
    path: Path | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(Path(self.path).read_bytes()).hexdigest() if self.path else ""

    def to_dict(self) -> dict:
        return {
            "version": VERSION,
            "layout_hash": self.layout_hash,
            "planned_tokens": int(self.planned_tokens),
            "train": {"prefixes": list(self.train_prefixes), "weights": [float(w) for w in self.train_weights]},
            "validation": dict(self.validation),
            "manifests": dict(self.manifests),
            "datasets": list(self.datasets),
        }

    def write(self, path: str | Path) -> Path:
        self.path = atomic.write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return self.path


def _missing(prefix: str) -> bool:
    return not (Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file())


def load(path: str | Path, check_files: bool = True) -> Blend:
    """Read and validate a blend file (prefixes exist, weights are a distribution)."""
    path = Path(path)
    if not path.is_file():
        raise BlendError(f"blend file not found: {path} (write one with data_prep/plan_mix.py)")
    raw = yaml.safe_load(path.read_text()) or {}
    if raw.get("version") != VERSION:
        raise BlendError(f"{path}: unsupported blend version {raw.get('version')!r} (expected {VERSION})")
    try:
        blend = Blend(
            layout_hash=str(raw["layout_hash"]),
            train_prefixes=[str(p) for p in raw["train"]["prefixes"]],
            train_weights=[float(w) for w in raw["train"]["weights"]],
            validation={str(k): str(v) for k, v in (raw.get("validation") or {}).items()},
            planned_tokens=int(raw.get("planned_tokens") or 0),
            manifests=dict(raw.get("manifests") or {}),
            datasets=list(raw.get("datasets") or []),
            path=path,
        )
    except (KeyError, TypeError) as e:
        raise BlendError(f"{path}: malformed blend file ({e!r}); regenerate it with data_prep/plan_mix.py") from e
    if not blend.train_prefixes or len(blend.train_prefixes) != len(blend.train_weights):
        raise BlendError(f"{path}: train.prefixes and train.weights must be non-empty and of equal length")
    if any(w < 0 for w in blend.train_weights) or abs(sum(blend.train_weights) - 1.0) > 1e-6:
        raise BlendError(f"{path}: train.weights must be >= 0 and sum to 1 (sum {sum(blend.train_weights):.6f})")
    if check_files:
        missing = [p for p in [*blend.train_prefixes, *blend.validation.values()] if _missing(p)]
        if missing:
            raise BlendError(f"{path}: dataset prefixes without .bin/.idx: {', '.join(missing)}")
    return blend
