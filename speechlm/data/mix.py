"""The pretraining mixture: dataset manifests + a mix config -> the blend file.

Every train prefix of every manifest is one dataset, named `audio/<lang>`, `tts/<lang>` or
`text/<source>/<lang>`. Its planned share of the training tokens is

    planned_i = share(kind_i) * n_i^alpha / sum_{j of kind_i} n_j^alpha        (n = train tokens)

alpha = 1 samples a kind's datasets in proportion to their size, alpha = 0 uniformly, and values
in between (default 0.7) lift the small languages. epochs_i = planned_i * planned_tokens / n_i.
A dataset whose epochs exceed its cap is warned about, refused, or capped (its excess is then
spread over the uncapped datasets of its kind, in proportion to their temperature weights).

Reads the manifests of both builders (`speechlm.data.speech`, `speechlm.data.text`): each has
`kind`, `layout_hash` and `datasets: {name: {kind, language, [source], train: {prefix,
documents, tokens, [hours]}, valid: {...}}}` with prefixes relative to the manifest.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
import yaml

from speechlm.data.blend_file import Blend

KINDS = ("audio", "tts", "text")
DEFAULT_SHARES = {"audio": 0.85, "tts": 0.10, "text": 0.05}
DEFAULT_ALPHA = 0.7
ON_EXCEED = ("warn", "error", "cap")
MANIFEST_FILE = "manifest.json"
_CONFIG_KEYS = {"planned_tokens", "kinds", "max_epochs", "on_exceed", "exclude"}
_EPS = 1e-12


class MixError(ValueError):
    """The manifests or the mix config cannot make a blend; the message says what to fix."""


# --- config ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MixConfig:
    planned_tokens: int
    shares: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SHARES))
    alphas: dict[str, float] = field(default_factory=lambda: {k: DEFAULT_ALPHA for k in KINDS})
    # epoch caps by dataset name, by kind, or "default"; the most specific wins
    max_epochs: dict[str, float] = field(default_factory=dict)
    on_exceed: str = "warn"
    # dataset names (fnmatch patterns: "tts/en", "text/*/or") left out of the plan entirely
    exclude: tuple[str, ...] = ()

    def excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude)

    def cap_for(self, name: str, kind: str) -> float | None:
        for key in (name, kind, "default"):
            if self.max_epochs.get(key) is not None:
                return float(self.max_epochs[key])
        return None


def load_config(path: str | Path) -> MixConfig:
    """Read a mix config (see recipes/data/default_mix.yaml and docs/mixture.md)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise MixError(f"{path}: a mix config is a mapping")
    unknown = set(raw) - _CONFIG_KEYS
    if unknown:
        raise MixError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(_CONFIG_KEYS)}")
    if not isinstance(raw.get("planned_tokens"), (int, float)) or raw["planned_tokens"] <= 0:
        raise MixError(f"{path}: planned_tokens (a positive number of training tokens) is required")
    kinds = raw.get("kinds")
    shares, alphas = dict(DEFAULT_SHARES), {k: DEFAULT_ALPHA for k in KINDS}
    if kinds is not None:
        if not isinstance(kinds, dict):
            raise MixError(f"{path}: kinds is a mapping kind -> {{share, alpha}}")
        bad = set(kinds) - set(KINDS)
        if bad:
            raise MixError(f"{path}: unknown kind(s) {sorted(bad)}; kinds are {', '.join(KINDS)}")
        shares = {k: 0.0 for k in KINDS}  # a kind left out of an explicit list gets nothing
        for k, v in kinds.items():
            v = v or {}
            extra = set(v) - {"share", "alpha"}
            if extra:
                raise MixError(f"{path}: kinds.{k} has unknown keys {sorted(extra)} (share, alpha)")
            shares[k] = float(v.get("share", 0.0))
            alphas[k] = float(v.get("alpha", DEFAULT_ALPHA))
    if any(s < 0 for s in shares.values()) or abs(sum(shares.values()) - 1.0) > 1e-6:
        raise MixError(f"{path}: kind shares must be >= 0 and sum to 1, got {shares} (sum {sum(shares.values()):.6g})")
    if any(a < 0 for a in alphas.values()):
        raise MixError(f"{path}: alpha must be >= 0, got {alphas}")
    caps = raw.get("max_epochs") or {}
    if not isinstance(caps, dict) or any(v is not None and (not isinstance(v, (int, float)) or v <= 0) for v in caps.values()):
        raise MixError(f"{path}: max_epochs maps a dataset name, a kind or 'default' to a positive number")
    on_exceed = raw.get("on_exceed", "warn")
    if on_exceed not in ON_EXCEED:
        raise MixError(f"{path}: on_exceed must be one of {ON_EXCEED}, got {on_exceed!r}")
    exclude = raw.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        raise MixError(f"{path}: exclude is a list of dataset names or patterns (text/*/or)")
    return MixConfig(int(raw["planned_tokens"]), shares, alphas, {str(k): v for k, v in caps.items()}, on_exceed,
                     tuple(exclude))


# --- manifests ---------------------------------------------------------------------------------
@dataclass
class Dataset:
    name: str
    kind: str
    language: str
    source: str | None
    prefix: str  # absolute
    valid_prefix: str | None  # absolute; None when the held-out part is empty
    tokens: int
    documents: int
    hours: float | None  # speech only
    manifest: str


def manifest_path(path: str | Path) -> Path:
    p = Path(path)
    return (p / MANIFEST_FILE if p.is_dir() else p).resolve()


def _has_files(prefix: str) -> bool:
    return Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()


def read_manifest(path: str | Path, exclude=lambda name: False) -> tuple[str, list[Dataset]]:
    """(layout hash, datasets) of one manifest (speech or text); MixError on anything unusable.
    Datasets whose name `exclude(name)` accepts are left out before any check."""
    path = manifest_path(path)
    if not path.is_file():
        raise MixError(f"no manifest at {path} (pass a build output directory or its manifest.json)")
    try:
        m = json.loads(path.read_text())
    except ValueError as e:
        raise MixError(f"{path}: not JSON ({e})") from None
    if not m.get("layout_hash"):
        raise MixError(f"{path}: manifest has no layout_hash")
    out = []
    for key, d in sorted((m.get("datasets") or {}).items()):
        kind = d.get("kind", m.get("kind"))
        if kind not in KINDS:
            raise MixError(f"{path}: dataset {key} has unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
        lang = d.get("language")
        source = d.get("source", m.get("source")) if kind == "text" else None
        if kind == "text" and not source:
            raise MixError(f"{path}: text dataset {key} names no source")
        name = f"{kind}/{source}/{lang}" if kind == "text" else f"{kind}/{lang}"
        if exclude(name):
            continue
        train, valid = d.get("train") or {}, d.get("valid") or {}
        if not train.get("prefix") or not train.get("tokens") or not train.get("documents"):
            raise MixError(f"{path}: dataset {name} is empty (no train documents): fix its input, or leave it "
                           f"out with `exclude: [{name}]` in the mix config")
        prefix = str((path.parent / train["prefix"]).resolve())
        if not _has_files(prefix):
            raise MixError(f"{path}: dataset {name}: prefix {prefix} has no .bin/.idx (moved or deleted?)")
        vprefix = None
        if valid.get("prefix") and valid.get("documents"):
            vprefix = str((path.parent / valid["prefix"]).resolve())
            if not _has_files(vprefix):
                raise MixError(f"{path}: dataset {name}: validation prefix {vprefix} has no .bin/.idx")
        hours = train.get("hours") if kind != "text" else None
        out.append(Dataset(name, kind, lang, source, prefix, vprefix, int(train["tokens"]), int(train["documents"]),
                           None if hours is None else float(hours), str(path)))
    if not m.get("datasets"):
        raise MixError(f"{path}: manifest lists no datasets")
    return str(m["layout_hash"]), out


# --- planning ----------------------------------------------------------------------------------
@dataclass
class Row:
    ds: Dataset
    natural_share: float  # of all train tokens
    temperature_share: float  # kind share * n^alpha / sum n^alpha, before caps
    planned_share: float
    epochs: float
    cap: float | None
    capped: bool = False


@dataclass
class Plan:
    layout_hash: str
    config: MixConfig
    rows: list[Row]
    manifests: dict[str, str]
    warnings: list[str]


def temperature_weights(tokens: list[int], alpha: float) -> list[float]:
    """p_i ∝ n_i^alpha, normalised (alpha = 0: uniform, alpha = 1: proportional)."""
    powered = [float(n) ** alpha for n in tokens]
    total = sum(powered)
    return [p / total for p in powered]


def _apply_caps(shares: list[float], weights: list[float], limits: list[float | None], kind: str) -> list[bool]:
    """Cap shares at their limits in place, spreading the excess over the uncapped datasets of the
    kind by their temperature weights (repeat: a redistribution can push another over)."""
    capped = [False] * len(shares)
    total = sum(shares)
    while True:
        over = [i for i, s in enumerate(shares) if not capped[i] and limits[i] is not None and s > limits[i] * (1 + 1e-9)]
        if not over:
            return capped
        for i in over:
            shares[i], capped[i] = limits[i], True
        free = [i for i in range(len(shares)) if not capped[i]]
        left = total - sum(shares[i] for i in range(len(shares)) if capped[i])
        wsum = sum(weights[i] for i in free)
        if not free or wsum <= 0:
            raise MixError(
                f"kind {kind}: every dataset reaches its epoch cap before the kind's share is filled; "
                "raise max_epochs, lower planned_tokens, or lower the kind's share"
            )
        for i in free:
            shares[i] = left * weights[i] / wsum


def plan(manifests: list[str | Path], config: MixConfig) -> Plan:
    """Read the manifests and compute every dataset's planned share (see the module docstring)."""
    hashes: dict[str, str] = {}
    datasets: list[Dataset] = []
    digests: dict[str, str] = {}
    for m in manifests:
        path = manifest_path(m)
        h, ds = read_manifest(path, config.excluded)
        hashes[str(path)] = h
        digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        datasets.extend(ds)
    if len(set(hashes.values())) > 1:
        listing = "; ".join(f"{p}: {h[:12]}" for p, h in hashes.items())
        raise MixError(f"manifests were built with different token layouts ({listing}); rebuild them with one model")
    seen: dict[str, str] = {}
    for d in datasets:
        if d.name in seen:
            raise MixError(f"dataset {d.name} is in two manifests ({seen[d.name]}, {d.manifest}); pass each once")
        seen[d.name] = d.manifest
    for kind, share in config.shares.items():
        if share > 0 and not any(d.kind == kind for d in datasets):
            raise MixError(f"the mix gives kind {kind} a share of {share}, but no manifest has {kind} datasets")

    total_tokens = sum(d.tokens for d in datasets)
    rows: list[Row] = []
    warnings: list[str] = []
    for kind in KINDS:
        group = sorted((d for d in datasets if d.kind == kind), key=lambda d: d.name)
        if not group:
            continue
        share = config.shares.get(kind, 0.0)
        if share == 0:
            warnings.append(f"kind {kind} has share 0: its {len(group)} dataset(s) are validation only")
        weights = temperature_weights([d.tokens for d in group], config.alphas[kind])
        temp = [share * w for w in weights]
        shares = list(temp)
        caps = [config.cap_for(d.name, kind) for d in group]
        limits = [None if c is None else c * d.tokens / config.planned_tokens for c, d in zip(caps, group)]
        over = [i for i, s in enumerate(shares) if limits[i] is not None and s > limits[i] * (1 + 1e-9)]
        capped = [False] * len(group)
        if over:
            text = ", ".join(f"{group[i].name} ({shares[i] * config.planned_tokens / group[i].tokens:.2f} epochs > cap {caps[i]:g})" for i in over)
            if config.on_exceed == "error":
                raise MixError(f"datasets over their epoch cap: {text} (on_exceed: error)")
            if config.on_exceed == "warn":
                warnings.append(f"over the epoch cap (kept, on_exceed: warn): {text}")
            else:
                capped = _apply_caps(shares, weights, limits, kind)
                moved = sum(t - s for t, s in zip(temp, shares) if t > s)
                warnings.append(f"capped (on_exceed: cap): {text}; {moved:.4%} of the tokens moved to the other {kind} datasets")
        for d, t, s, c, k in zip(group, temp, shares, caps, capped):
            rows.append(Row(d, d.tokens / total_tokens, t, s, s * config.planned_tokens / d.tokens, c, k))
    return Plan(next(iter(hashes.values())), config, rows, digests, warnings)


# --- outputs -----------------------------------------------------------------------------------
def to_blend(p: Plan) -> Blend:
    train = [r for r in p.rows if r.planned_share > 0]
    total = sum(r.planned_share for r in train)
    weights = [r.planned_share / total for r in train]  # exact renormalisation against float drift
    rows = []
    for r in p.rows:
        rows.append({
            "name": r.ds.name, "kind": r.ds.kind, "language": r.ds.language, "prefix": r.ds.prefix,
            "tokens": r.ds.tokens, "natural_share": r.natural_share, "planned_share": r.planned_share,
            "epochs": r.epochs, "hours": r.ds.hours,
        })
    return Blend(
        layout_hash=p.layout_hash,
        train_prefixes=[r.ds.prefix for r in train],
        train_weights=weights,
        validation={r.ds.name: r.ds.valid_prefix for r in p.rows if r.ds.valid_prefix},
        planned_tokens=p.config.planned_tokens,
        manifests=dict(p.manifests),
        datasets=rows,
    )


def _fmt_tokens(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def report(p: Plan) -> str:
    """The plan as markdown: a row per dataset, a line per kind, then the warnings."""
    c = p.config
    lines = [
        f"# Mixture plan: {_fmt_tokens(c.planned_tokens)} training tokens",
        "",
        f"layout {p.layout_hash[:12]}; on_exceed: {c.on_exceed}",
        "",
        "| dataset | tokens | hours | natural share | after temperature | planned share | epochs | cap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in p.rows:
        hours = "–" if r.ds.hours is None else f"{r.ds.hours:,.1f}"
        cap = "–" if r.cap is None else f"{r.cap:g}" + (" (capped)" if r.capped else "")
        lines.append(
            f"| {r.ds.name} | {_fmt_tokens(r.ds.tokens)} | {hours} | {r.natural_share:.4%} | "
            f"{r.temperature_share:.4%} | {r.planned_share:.4%} | {r.epochs:.3f} | {cap} |"
        )
    lines += ["", "| kind | share | alpha | datasets | tokens |", "|---|---:|---:|---:|---:|"]
    for kind in KINDS:
        rs = [r for r in p.rows if r.ds.kind == kind]
        if rs:
            lines.append(f"| {kind} | {c.shares[kind]:.4f} | {c.alphas[kind]:g} | {len(rs)} | {_fmt_tokens(sum(r.ds.tokens for r in rs))} |")
    if p.warnings:
        lines += ["", "Warnings:"] + [f"- {w}" for w in p.warnings]
    return "\n".join(lines) + "\n"


def language_chart(p: Plan, path: str | Path) -> Path:
    """Per kind, each language's share of the kind before temperature (natural) and as planned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS if any(r.ds.kind == k for r in p.rows)]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, 3.2 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        rs = [r for r in p.rows if r.ds.kind == kind]
        langs = sorted({r.ds.language for r in rs})
        ktok = sum(r.ds.tokens for r in rs)
        kplan = sum(r.planned_share for r in rs) or 1.0
        natural = [sum(r.ds.tokens for r in rs if r.ds.language == lang) / ktok for lang in langs]
        planned = [sum(r.planned_share for r in rs if r.ds.language == lang) / kplan for lang in langs]
        x = range(len(langs))
        ax.bar([i - 0.2 for i in x], natural, 0.4, label="natural (by tokens)")
        ax.bar([i + 0.2 for i in x], planned, 0.4, label=f"planned (alpha {p.config.alphas[kind]:g}, caps)")
        ax.set_xticks(list(x), langs)
        ax.set_ylabel("share of kind")
        ax.set_title(f"{kind}: {p.config.shares[kind]:.0%} of the training tokens")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def outputs_for(blend_path: str | Path) -> tuple[Path, Path]:
    """(report, chart) paths next to a blend file: blend.yaml -> blend.report.md, blend.languages.png."""
    b = Path(blend_path)
    stem = b.name[: -len(b.suffix)] if b.suffix in (".yaml", ".yml") else b.name
    return b.with_name(stem + ".report.md"), b.with_name(stem + ".languages.png")


def write_plan(manifests: list[str | Path], config: MixConfig | str | Path, output: str | Path) -> tuple[Plan, str]:
    """Plan, write the blend file, its report and its chart; returns (plan, report text)."""
    cfg = config if isinstance(config, MixConfig) else load_config(config)
    p = plan(manifests, cfg)
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    to_blend(p).write(output)
    text = report(p)
    rep, chart = outputs_for(output)
    rep.write_text(text)
    language_chart(p, chart)
    return p, text


def binomial_tolerance(share: float, n: int, z: float = 4.0) -> float:
    """z standard errors of a share estimated from n independent draws (for checks of a blend)."""
    return z * math.sqrt(max(share * (1 - share), 0.0) / n)


__all__ = [
    "KINDS", "MixConfig", "MixError", "Dataset", "Plan", "Row", "load_config", "read_manifest",
    "plan", "to_blend", "report", "language_chart", "write_plan", "temperature_weights",
    "binomial_tolerance", "outputs_for",
]

