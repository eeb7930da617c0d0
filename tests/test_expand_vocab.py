"""Vocabulary expansion of a tiny Llama-3.2 model with the real Llama-3 tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from speechlm import token_layout as tl
from speechlm.model import vocab_expansion as ve
from speechlm.token_layout import TokenLayout
from speechlm.model.vocab_expansion import ExpansionError, expand_vocab

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "conversion" / "expand_vocab.py"
TEXTS = {
    "en": "The quick brown fox jumps over the lazy dog. It's 3:45 pm, isn't it?",
    "hi": "भारत एक विशाल देश है, जहाँ अनेक भाषाएँ बोली जाती हैं।",
    "ta": "தமிழ் மொழி மிகவும் பழமையான மொழிகளில் ஒன்றாகும்.",
}
OLD_KEPT = np.setdiff1d(np.arange(tl.TEXT_VOCAB_SIZE), sorted(tl.SPECIAL_IDS))  # rows that must not change


def _tok(d: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d)


def _added(d: Path) -> dict[int, dict]:
    return {e["id"]: e for e in json.loads((d / "tokenizer.json").read_text())["added_tokens"]}


# --- tokenizer -------------------------------------------------------------------------------
def test_tokenizer(tiny_llama_dir, expanded_tiny_dir):
    layout = TokenLayout()
    assert layout.check_tokenizer(tiny_llama_dir) == "unexpanded"
    assert layout.check_tokenizer(expanded_tiny_dir) == "expanded"
    before, after = _added(tiny_llama_dir), _added(expanded_tiny_dir)
    for i in range(tl.BOS_ID, tl.TEXT_VOCAB_SIZE):
        if i in tl.SPECIAL_IDS:  # our specials are former reserved ids
            assert before[i]["content"].startswith("<|reserved_special_token_")
            assert after[i]["content"] in tl.SPECIALS and tl.SPECIALS[after[i]["content"]] == i
        else:  # BOS, EOT, headers, eot_id, eom, python_tag and the unused reserved ids unchanged
            assert after[i] == before[i]

    t0 = time.perf_counter()
    new = _tok(expanded_tiny_dir)
    load_s = time.perf_counter() - t0
    old = _tok(tiny_llama_dir)
    assert load_s < 30, f"expanded tokenizer took {load_s:.1f} s to load"
    assert len(new) == tl.VOCAB_SIZE and len(old) == tl.TEXT_VOCAB_SIZE
    assert new("<|speech_start|><|s_5|>", add_special_tokens=False).input_ids == [layout.speech_start_id, 128261]
    speech = layout.audio_document([0, 5, 65535]).tolist()
    assert new.convert_ids_to_tokens(speech) == ["<|speech_start|>", "<|s_0|>", "<|s_5|>", "<|s_65535|>", "<|speech_end|>", "<|end_of_text|>"]
    assert new(new.decode(speech[:-1]), add_special_tokens=False).input_ids == speech[:-1]
    assert new.pad_token_id == layout.pad_id and new.bos_token_id == tl.BOS_ID and new.eos_token_id == tl.EOD_ID
    for lang, text in TEXTS.items():
        for special in (True, False):
            ids = old(text, add_special_tokens=special).input_ids
            assert new(text, add_special_tokens=special).input_ids == ids, lang
            assert max(ids) < tl.BOS_ID or special
        ids = old(text, add_special_tokens=False).input_ids
        assert new.decode(ids) == old.decode(ids) == text


# --- weights ---------------------------------------------------------------------------------
def test_weights_and_configs(tiny_llama_dir, expanded_tiny_dir):
    before = load_file(tiny_llama_dir / "model.safetensors")
    after = load_file(expanded_tiny_dir / "model.safetensors")
    assert set(before) == set(after)
    for k, w in before.items():
        if k == ve.EMBED:
            a = after[k]
            assert a.shape == (tl.VOCAB_SIZE, w.shape[1]) and a.dtype == w.dtype
            assert torch.equal(a[OLD_KEPT], w[OLD_KEPT])  # bit-identical, reserved rows left alone too
            assert not torch.equal(a[sorted(tl.SPECIAL_IDS)], w[sorted(tl.SPECIAL_IDS)])  # re-initialised
        else:
            assert torch.equal(after[k], w), k
    cfg = json.loads((expanded_tiny_dir / "config.json").read_text())
    old_cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    assert cfg["vocab_size"] == tl.VOCAB_SIZE and cfg["pad_token_id"] == TokenLayout().pad_id
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (old_cfg["bos_token_id"], old_cfg["eos_token_id"])
    gen = json.loads((expanded_tiny_dir / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) == {TokenLayout().speech_end_id, tl.EOD_ID}
    assert TokenLayout.load(expanded_tiny_dir) == TokenLayout()
    assert not list(expanded_tiny_dir.parent.glob(".*partial*"))


def _logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_text_logits_unchanged(tiny_llama_dir, expanded_tiny_dir):
    ids = _tok(tiny_llama_dir)(TEXTS["en"] + " " + TEXTS["hi"]).input_ids
    old, new = _logits(tiny_llama_dir, ids), _logits(expanded_tiny_dir, ids)
    assert new.shape[-1] == tl.VOCAB_SIZE
    # Logits over the old vocabulary are unchanged, except at the re-used reserved rows (tied head).
    assert torch.equal(new[:, OLD_KEPT], old[:, OLD_KEPT])


# --- statistics of the new rows --------------------------------------------------------------
@pytest.fixture(scope="module")
def skewed_untied_dir(tiny_llama_untied_dir, tmp_path_factory) -> Path:
    """Untied tiny model whose input/output rows have different, correlated, non-zero-mean
    distributions, and whose reserved rows are wild (they must not enter the statistics)."""
    d = tmp_path_factory.mktemp("skewed") / "model"
    shutil.copytree(tiny_llama_untied_dir, d)
    w = load_file(d / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    for k, shift in ((ve.EMBED, 0.05), (ve.LM_HEAD, -0.2)):
        hidden = w[k].shape[1]
        mix = torch.randn(hidden, hidden, generator=g) * 0.02
        mean = shift + 0.01 * torch.randn(hidden, generator=g)
        w[k] = torch.randn(tl.TEXT_VOCAB_SIZE, hidden, generator=g) @ mix + mean
        w[k][tl.EOD_ID + 1 :] = 100.0  # never-trained reserved rows
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_new_rows_match_statistics_untied(skewed_untied_dir, tmp_path):
    summary = expand_vocab(skewed_untied_dir, tmp_path / "out", seed=3)
    assert not summary.tied and [m.name for m in summary.matrices] == [ve.EMBED, ve.LM_HEAD]
    before = load_file(skewed_untied_dir / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    for k in (ve.EMBED, ve.LM_HEAD):
        assert torch.equal(after[k][OLD_KEPT], before[k][OLD_KEPT])
        trained = before[k][: tl.EOD_ID + 1].double().numpy()
        mu, sigma = trained.mean(0), np.cov(trained, rowvar=False)
        new = after[k][ve.NEW_ROW_IDS].double().numpy()
        n = len(new)
        assert n == tl.CODEC_SIZE + len(tl.SPECIAL_IDS)
        # The n new rows are i.i.d. N(mu, sigma) (statistics over 128,002 rows: their own error is
        # ~2x smaller and is ignored). Sample mean: per dimension N(mu_j, sigma_jj / n); 5 standard
        # errors gives a false alarm per dimension of 6e-7, < 4e-5 over 64 dimensions.
        se_mean = np.sqrt(np.diag(sigma) / n)
        assert np.all(np.abs(new.mean(0) - mu) < 5 * se_mean)
        # Sample covariance entry (i, j) of a Gaussian: variance (sigma_ij^2 + sigma_ii sigma_jj) / (n-1),
        # near-normal at this n; 6 standard errors: false alarm ~2e-9 per entry, < 1e-5 over 2,080 entries.
        se_cov = np.sqrt((sigma**2 + np.outer(np.diag(sigma), np.diag(sigma))) / (n - 1))
        assert np.all(np.abs(np.cov(new, rowvar=False) - sigma) < 6 * se_cov)
        # The bound is tight enough to catch mean_resizing's 1e-9 x covariance or a diagonal-only fit.
        assert np.abs(np.diag(sigma)).min() > 6 * se_cov.max() and np.abs(sigma - np.diag(np.diag(sigma))).max() > 6 * se_cov.max()
    # Each matrix from its own statistics: the two means differ by far more than their errors.
    assert abs(summary.matrices[0].mean_norm - summary.matrices[1].mean_norm) > 0.5


def test_init_scale_and_seed(tiny_llama_untied_dir, tmp_path):
    a = expand_vocab(tiny_llama_untied_dir, tmp_path / "a", seed=5, init_scale=0.25)
    b = expand_vocab(tiny_llama_untied_dir, tmp_path / "b", seed=5, init_scale=0.25, language_tags=True)
    for m in a.matrices:
        # trace of a sample covariance over n = 65,551 rows in 64 dims: relative error ~ sqrt(2/(n d)) < 1 %
        assert m.sampled_cov_trace == pytest.approx(0.25 * m.cov_trace, rel=0.03)
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, same rows
    assert TokenLayout.load(tmp_path / "b") == TokenLayout(language_tags=True) != TokenLayout.load(tmp_path / "a")
    logits_old = _logits(tiny_llama_untied_dir, [tl.BOS_ID, 791, 4062])
    logits_new = _logits(tmp_path / "a", [tl.BOS_ID, 791, 4062])
    assert torch.equal(logits_new[:, OLD_KEPT], logits_old[:, OLD_KEPT])


# --- bad input -------------------------------------------------------------------------------
def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial*"))


def test_refuses_expanded_model(expanded_tiny_dir, tmp_path):
    with pytest.raises(ExpansionError, match="already expanded"):
        expand_vocab(expanded_tiny_dir, tmp_path / "out")
    _no_output(tmp_path / "out")
    # Even without the layout file, the vocabulary size gives it away.
    d = tmp_path / "copy"
    shutil.copytree(expanded_tiny_dir, d)
    (d / tl.LAYOUT_FILE).unlink()
    with pytest.raises(ExpansionError, match="already expanded"):
        expand_vocab(d, tmp_path / "out")
    _no_output(tmp_path / "out")


def _light_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).symlink_to(p) if p.name == "model.safetensors" else shutil.copyfile(p, dst / p.name)
    return dst


def test_refuses_foreign_tokenizer(tiny_llama_dir, tmp_path):
    d = _light_copy(tiny_llama_dir, tmp_path / "foreign")
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["added_tokens"] = [e for e in tok["added_tokens"] if e["id"] < 128100]  # a 128,100-token vocabulary
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ExpansionError, match="not an unexpanded Llama-3 tokenizer"):
        expand_vocab(d, tmp_path / "out")
    _no_output(tmp_path / "out")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": 32000}))
    with pytest.raises(ExpansionError, match="not Llama-3's"):
        expand_vocab(d, tmp_path / "out")


@pytest.mark.parametrize("missing", ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"])
def test_refuses_missing_file(tiny_llama_dir, tmp_path, missing):
    d = _light_copy(tiny_llama_dir, tmp_path / "in")
    (d / missing).unlink()
    with pytest.raises(ExpansionError, match=f"missing file: .*{missing}"):
        expand_vocab(d, tmp_path / "out")
    _no_output(tmp_path / "out")


def test_crash_leaves_no_output(tiny_llama_dir, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ve, "write_configs", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        expand_vocab(tiny_llama_dir, tmp_path / "out")
    _no_output(tmp_path / "out")


def test_cli_existing_output_and_overwrite(tiny_llama_dir, tmp_path):
    help_ = subprocess.run([sys.executable, str(CLI), "--help"], capture_output=True, text=True, check=True)
    assert "--init-scale" in help_.stdout and "--overwrite" in help_.stdout
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = subprocess.run([sys.executable, str(CLI), "--input", str(tiny_llama_dir), "--output", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "exists" in r.stderr and "--overwrite" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    r = subprocess.run(
        [sys.executable, str(CLI), "--input", str(tiny_llama_dir), "--output", str(out), "--overwrite", "--language-tags"],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "rows added: 65536" in r.stdout and "cov trace" in r.stdout
    assert not (out / "keep.txt").exists() and TokenLayout.load(out) == TokenLayout(language_tags=True)


def test_row_statistics_float64_accuracy():
    # bf16 rows far from the origin: the shifted one-pass covariance must match numpy's centred one.
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(20_000, 32, generator=g, dtype=torch.float64) @ torch.randn(32, 32, generator=g, dtype=torch.float64) * 0.01 + 3.0).to(torch.bfloat16)
    mean, cov = ve.row_statistics(w, 20_000)
    x = w.double().numpy()
    assert np.allclose(mean, x.mean(0), rtol=0, atol=1e-12)
    assert np.allclose(cov, np.cov(x, rowvar=False), rtol=0, atol=1e-12 * np.abs(cov).max())
