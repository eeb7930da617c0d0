"""The mixture planner: hand-computed weights, caps, errors, the blend file, and megatron-core's
blended dataset drawing samples in the planned proportions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from speechlm.data import blend_file
from speechlm.data import mix
from speechlm.token_layout import EOD_ID, TokenLayout

LAYOUT_HASH = TokenLayout().layout_hash
REPO = Path(__file__).resolve().parent.parent


def _write_prefix(prefix: Path, docs: list[np.ndarray]) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for d in docs:
        b.add_document(np.asarray(d, np.int32), [len(d)])
    b.finalize(str(prefix) + ".idx")


def _marker_docs(marker: int, n_docs: int, doc_len: int) -> list[np.ndarray]:
    # every token of a dataset is its marker id (then EOD), so a sample tells where it came from
    return [np.array([marker] * (doc_len - 1) + [EOD_ID], np.int32) for _ in range(n_docs)]


def make_manifest(out: Path, kind: str, datasets: dict[str, int], source: str | None = None,
                  layout_hash: str = LAYOUT_HASH, marker0: int = 1000, doc_len: int = 50,
                  with_files: bool = True) -> Path:
    """A build output dir with manifest.json in the builders' shape. datasets: language -> train
    tokens (the files hold real documents only when sizes allow: planner tests only read counts)."""
    out.mkdir(parents=True, exist_ok=True)
    entries = {}
    for i, (lang, tokens) in enumerate(sorted(datasets.items())):
        stem = f"{source}_{lang}" if kind == "text" else f"{kind}_{lang}"
        n_docs = max(1, tokens // doc_len)
        if with_files:
            _write_prefix(out / f"{stem}_train", _marker_docs(marker0 + i, n_docs if tokens < 10**6 else 2, doc_len))
            _write_prefix(out / f"{stem}_valid", _marker_docs(marker0 + i, 2, doc_len))
        entry = {
            "kind": kind, "language": lang,
            "train": {"prefix": f"{stem}_train", "documents": n_docs, "tokens": tokens,
                      "hours": 0.0 if kind == "text" else tokens / 50 / 3600},
            "valid": {"prefix": f"{stem}_valid", "documents": 2, "tokens": 2 * doc_len},
            "skips": {},
        }
        if kind == "text":
            entry["source"] = source
        entries[stem] = entry
    manifest = {"version": 1, "kind": kind, "layout_hash": layout_hash, "datasets": entries}
    if source:
        manifest["source"] = source
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def _cli_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_mix_cli", REPO / "data_prep" / "plan_mix.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def cfg(**kw) -> mix.MixConfig:
    base = dict(planned_tokens=10_000_000, shares={"audio": 0.85, "tts": 0.10, "text": 0.05},
                alphas={"audio": 0.7, "tts": 0.7, "text": 0.7})
    base.update(kw)
    return mix.MixConfig(**base)


@pytest.fixture
def three_kinds(tmp_path) -> list[Path]:
    return [
        make_manifest(tmp_path / "audio", "audio", {"hi": 1_000_000, "ta": 8_000_000, "en": 27_000_000}, with_files=True),
        make_manifest(tmp_path / "tts", "tts", {"hi": 200_000, "ta": 800_000}),
        make_manifest(tmp_path / "text", "text", {"hi": 50_000, "ta": 50_000}, source="sangraha"),
    ]


def _shares(p: mix.Plan) -> dict[str, float]:
    return {r.ds.name: r.planned_share for r in p.rows}


# --- weights -------------------------------------------------------------------------------------
def test_alpha_one_is_proportional(three_kinds):
    s = _shares(mix.plan(three_kinds, cfg(alphas={"audio": 1.0, "tts": 1.0, "text": 1.0})))
    assert s["audio/hi"] == pytest.approx(0.85 * 1 / 36, rel=1e-12)
    assert s["audio/ta"] == pytest.approx(0.85 * 8 / 36, rel=1e-12)
    assert s["audio/en"] == pytest.approx(0.85 * 27 / 36, rel=1e-12)
    assert s["tts/hi"] == pytest.approx(0.02) and s["tts/ta"] == pytest.approx(0.08)
    assert s["text/sangraha/hi"] == pytest.approx(0.025)


def test_alpha_zero_is_uniform(three_kinds):
    s = _shares(mix.plan(three_kinds, cfg(alphas={"audio": 0.0, "tts": 0.0, "text": 0.0})))
    for lang in ("hi", "ta", "en"):
        assert s[f"audio/{lang}"] == pytest.approx(0.85 / 3)
    assert s["tts/hi"] == pytest.approx(0.05) and s["tts/ta"] == pytest.approx(0.05)


def test_alpha_07_hand_computed(three_kinds):
    # tokens 1 : 8 : 27 (x 10^6): n^0.7 = 1 : 8^0.7 : 27^0.7 = 1 : 4.2870939 : 10.0451086
    # (2^2.1 and 3^2.1); sum 15.3322024
    s = _shares(mix.plan(three_kinds, cfg()))
    assert s["audio/hi"] == pytest.approx(0.85 * 1 / 15.3322024, rel=1e-6)
    assert s["audio/ta"] == pytest.approx(0.85 * 4.2870939 / 15.3322024, rel=1e-6)
    assert s["audio/en"] == pytest.approx(0.85 * 10.0451086 / 15.3322024, rel=1e-6)
    # tts: 1 : 4 -> 1 : 4^0.7 = 1 : 2.6390158
    assert s["tts/hi"] == pytest.approx(0.10 / 3.6390158, rel=1e-6)
    assert sum(s.values()) == pytest.approx(1.0, abs=1e-12)


def test_epochs_and_natural_share(three_kinds):
    p = mix.plan(three_kinds, cfg(planned_tokens=10_000_000))
    total = 1e6 + 8e6 + 27e6 + 2e5 + 8e5 + 1e5
    for r in p.rows:
        assert r.natural_share == pytest.approx(r.ds.tokens / total)
        assert r.epochs == pytest.approx(r.planned_share * 10_000_000 / r.ds.tokens)


# --- caps ----------------------------------------------------------------------------------------
def test_cap_warn_error_cap(three_kinds):
    # text gets 5 % of 10 M = 500 k tokens over 100 k text tokens: 5 epochs each at alpha 0.7
    caps = {"text/sangraha/hi": 2.0}
    p = mix.plan(three_kinds, cfg(max_epochs=caps, on_exceed="warn"))
    assert _shares(p)["text/sangraha/hi"] == pytest.approx(0.025)
    assert any("over the epoch cap" in w and "text/sangraha/hi" in w for w in p.warnings)

    with pytest.raises(mix.MixError, match="text/sangraha/hi.*cap"):
        mix.plan(three_kinds, cfg(max_epochs=caps, on_exceed="error"))

    p = mix.plan(three_kinds, cfg(max_epochs=caps, on_exceed="cap"))
    s = _shares(p)
    assert s["text/sangraha/hi"] == pytest.approx(2.0 * 50_000 / 10_000_000)  # 1 %
    assert s["text/sangraha/ta"] == pytest.approx(0.05 - 0.01)  # the excess stays within text
    assert sum(s.values()) == pytest.approx(1.0)
    row = next(r for r in p.rows if r.ds.name == "text/sangraha/hi")
    assert row.capped and row.epochs == pytest.approx(2.0)
    assert any("capped" in w and "moved" in w for w in p.warnings)


def test_cap_redistribution_cascades_and_can_fail(three_kinds):
    # audio: 8.5 M planned tokens; cap 0.3 epochs by kind -> hi 0.3 M and ta 2.4 M at most;
    # en takes the rest (5.8 M of 27 M)
    p = mix.plan(three_kinds, cfg(max_epochs={"audio": 0.3}, on_exceed="cap"))
    s = _shares(p)
    assert s["audio/hi"] == pytest.approx(0.03) and s["audio/ta"] == pytest.approx(0.24)
    assert s["audio/en"] == pytest.approx(0.85 - 0.27)
    with pytest.raises(mix.MixError, match="every dataset reaches its epoch cap"):
        mix.plan(three_kinds, cfg(max_epochs={"text": 1.0}, on_exceed="cap"))


# --- errors --------------------------------------------------------------------------------------
def test_errors(tmp_path, three_kinds):
    with pytest.raises(mix.MixError, match="different token layouts"):
        mix.plan([*three_kinds, make_manifest(tmp_path / "other", "tts", {"en": 10}, layout_hash="0" * 64)], cfg())
    with pytest.raises(mix.MixError, match="no manifest has text"):
        mix.plan(three_kinds[:2], cfg())
    empty = make_manifest(tmp_path / "empty", "text", {"en": 100}, source="web")
    m = json.loads((empty / "manifest.json").read_text())
    m["datasets"]["web_en"]["train"].update(documents=0, tokens=0)
    (empty / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(mix.MixError, match="text/web/en is empty.*exclude"):
        mix.plan([*three_kinds, empty], cfg())
    kept = mix.plan([*three_kinds, empty], cfg(exclude=("text/web/*",)))  # left out on purpose
    assert "text/web/en" not in {r.ds.name for r in kept.rows}
    gone = make_manifest(tmp_path / "gone", "text", {"en": 100}, source="web")
    (gone / "web_en_train.idx").unlink()
    with pytest.raises(mix.MixError, match="has no .bin/.idx"):
        mix.plan([*three_kinds, gone], cfg())
    odd = make_manifest(tmp_path / "odd", "text", {"en": 100}, source="web")
    m = json.loads((odd / "manifest.json").read_text())
    m["datasets"]["web_en"]["kind"] = "video"
    (odd / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(mix.MixError, match="unknown kind 'video'"):
        mix.plan([*three_kinds, odd], cfg())
    with pytest.raises(mix.MixError, match="no manifest at"):
        mix.plan([tmp_path / "nowhere"], cfg())


@pytest.mark.parametrize("body,match", [
    ("planned_tokens: 1000\nkinds: {audio: {share: 0.8}, text: {share: 0.1}}\n", "sum to 1"),
    ("planned_tokens: 1000\nkinds: {audio: {share: 0.9}, speech: {share: 0.1}}\n", "unknown kind"),
    ("kinds: {audio: {share: 1.0}}\n", "planned_tokens"),
    ("planned_tokens: 1000\non_exceed: ignore\n", "on_exceed"),
    ("planned_tokens: 1000\nalpha: 0.5\n", "unknown keys"),
])
def test_config_errors(tmp_path, body, match):
    (tmp_path / "m.yaml").write_text(body)
    with pytest.raises(mix.MixError, match=match):
        mix.load_config(tmp_path / "m.yaml")


def test_default_config_loads():
    c = mix.load_config(REPO / "recipes/data/default_mix.yaml")
    assert c.shares == {"audio": 0.85, "tts": 0.10, "text": 0.05}
    assert set(c.alphas.values()) == {0.7}


# --- the blend file ------------------------------------------------------------------------------
def test_cli_writes_blend_report_chart(tmp_path, three_kinds, capsys):
    main = _cli_main()

    (tmp_path / "mix.yaml").write_text("planned_tokens: 10_000_000\nmax_epochs: {text/sangraha/hi: 2}\non_exceed: cap\n")
    out = tmp_path / "blends" / "blend.yaml"
    assert main(["--manifests", *map(str, three_kinds), "--config", str(tmp_path / "mix.yaml"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| audio/hi |" in printed and "capped" in printed
    raw = yaml.safe_load(out.read_text())
    assert list(raw) == ["version", "layout_hash", "planned_tokens", "train", "validation", "manifests", "datasets"]
    assert raw["version"] == 1 and raw["layout_hash"] == LAYOUT_HASH and raw["planned_tokens"] == 10_000_000
    assert sum(raw["train"]["weights"]) == pytest.approx(1.0, abs=1e-12)
    assert all(Path(p).is_absolute() for p in raw["train"]["prefixes"])
    assert set(raw["validation"]) == {"audio/en", "audio/hi", "audio/ta", "tts/hi", "tts/ta", "text/sangraha/hi", "text/sangraha/ta"}
    for path, digest in raw["manifests"].items():
        import hashlib

        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest
    row = next(d for d in raw["datasets"] if d["name"] == "audio/hi")
    assert set(row) == {"name", "kind", "language", "prefix", "tokens", "natural_share", "planned_share", "epochs", "hours"}
    assert row["hours"] == pytest.approx(1_000_000 / 50 / 3600)
    assert next(d for d in raw["datasets"] if d["kind"] == "text")["hours"] is None
    b = blend_file.load(out)  # the training side's reader accepts it
    assert b.train_prefixes == raw["train"]["prefixes"]
    assert (tmp_path / "blends" / "blend.report.md").read_text().startswith("# Mixture plan")
    assert (tmp_path / "blends" / "blend.languages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_error_exit(tmp_path, three_kinds, capsys):
    main = _cli_main()

    (tmp_path / "mix.yaml").write_text("planned_tokens: 1000\nkinds: {audio: {share: 0.5}}\n")
    assert main(["--manifests", str(three_kinds[0]), "--config", str(tmp_path / "mix.yaml"), "--output", str(tmp_path / "b.yaml")]) == 2
    assert "sum to 1" in capsys.readouterr().err


# --- megatron-core draws the planned proportions -------------------------------------------------
class _Tok:
    vocab_size = 193_792
    eod = EOD_ID
    pad = 128_013
    unique_identifiers = {"class": "test-tokenizer"}


def test_blended_dataset_follows_the_plan(tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    # small real datasets (tokens as the files hold them); 1000 + i marks dataset i
    ms = [
        make_manifest(tmp_path / "audio", "audio", {"hi": 2_000, "ta": 20_000}, marker0=1000),
        make_manifest(tmp_path / "tts", "tts", {"hi": 5_000}, marker0=2000),
        make_manifest(tmp_path / "text", "text", {"hi": 1_000, "ta": 4_000}, source="web", marker0=3000),
    ]
    out = tmp_path / "blend.yaml"
    p, _ = mix.write_plan(ms, cfg(planned_tokens=1_000_000), out)
    b = blend_file.load(out)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    marker_of = {}
    for r in p.rows:
        ds = IndexedDataset(r.ds.prefix)  # keep it alive: its items are views of its mmap
        marker_of[r.ds.prefix] = int(ds[0][0])
        del ds

    n = 20_000
    seq = 32
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=seq, blend=(b.train_prefixes, b.train_weights), split="100,0,0",
        tokenizer=_Tok(), reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"),
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [n, 0, 0], lambda: True, config).build()
    assert len(train) >= n  # megatron may round the blend up by a few samples
    counts = np.zeros(len(b.train_prefixes))
    for i in range(n):
        s = train[i]
        k = int(s["dataset_id"])
        counts[k] += 1
        if i % 97 == 0:  # the sample's tokens are the dataset's: ids map to the planned prefixes
            toks = set(s["tokens"].tolist()) - {EOD_ID}
            assert toks == {marker_of[b.train_prefixes[k]]}
    # Tolerance: 4 binomial standard errors of a share estimated from n draws,
    # 4 * sqrt(w (1 - w) / n) (<= 0.014 here). megatron's blending is deterministic
    # (greedy on the running error), so the counts are in fact within a sample or two.
    for w, c in zip(b.train_weights, counts):
        assert abs(c / n - w) <= mix.binomial_tolerance(w, n), (w, c / n)
        assert math.isclose(c / n, w, abs_tol=2 / n + 1e-9)


# --- real manifests of both builders -------------------------------------------------------------
def test_plans_real_speech_and_text_builds(expanded_tiny_dir, tmp_path):
    import webdataset as wds

    from speechlm.data import speech
    from speechlm.data import text as text_mod

    rng = np.random.default_rng(0)
    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "shard-000000.tar")) as tw:
        for i in range(30):
            codes = rng.integers(0, 65536, int(rng.integers(20, 200))).astype(np.int32)
            tw.write({"__key__": f"s{i:04d}", "codes.npy": codes,
                      "json": {"language": ("hi", "ta")[i % 2], "text": "namaste duniya " * (1 + i % 3)}})
    (tmp_path / "text").mkdir()
    rows = [{"text": f"{i} " + "भारत एक विशाल देश है। " * 12, "language": "hi"} for i in range(20)]
    (tmp_path / "text" / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    outs = []
    for kind in ("audio", "tts"):
        s = speech.build(str(tmp_path / "shards"), expanded_tiny_dir, tmp_path / kind, kind, seq_length=256,
                         valid_fraction=0.2, progress=False)
        assert not s["failed"]
        outs.append(tmp_path / kind)
    text_mod.build(str(tmp_path / "text"), expanded_tiny_dir, tmp_path / "textout", "sangraha", seq_length=256,
                   valid_fraction=0.2, progress=False)
    outs.append(tmp_path / "textout")
    out = tmp_path / "blend.yaml"
    p, _ = mix.write_plan(outs, cfg(planned_tokens=100_000), out)
    names = sorted(r.ds.name for r in p.rows)
    assert names == ["audio/hi", "audio/ta", "text/sangraha/hi", "tts/hi", "tts/ta"]
    b = blend_file.load(out)
    assert b.layout_hash == TokenLayout.load(expanded_tiny_dir).layout_hash
    assert set(b.validation) <= set(names) and "audio/hi" in b.validation
    speech_hours = {d["name"]: d["hours"] for d in b.datasets}
    assert speech_hours["audio/hi"] > 0 and speech_hours["text/sangraha/hi"] is None
