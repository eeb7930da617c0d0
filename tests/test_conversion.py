"""HF <-> Megatron conversion of the expanded model (issue 4), on CPU with a tiny expanded Llama-3.2.

The conversions run as the users run them: the CLIs, in their own processes (plain python, or
torchrun for TP 2). Checks that need no Megatron (token layouts, iterations) run in-process.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_torchrun
from speechlm.token_layout import LayoutMismatchError, TokenLayout, ids_to_codes, is_speech

pytestmark = pytest.mark.slow
LAYOUT = TokenLayout()


def _cli(script: str, *args, expect: int = 0) -> str:
    proc = subprocess.run([sys.executable, f"conversion/{script}.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, out[-4000:]
    return out


def _env() -> dict:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(hf_dir / "model.safetensors")


def _hf(hf_dir: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()


def _no_partial_dirs(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".partial-" in p.name]


@pytest.fixture(scope="module")
def converted(converted_tiny_dir) -> Path:
    """expanded_tiny_dir as a TP 1 Megatron checkpoint (plain python process; the session's, which
    the recipe matrix starts from too)."""
    log = converted_tiny_dir.with_suffix(".log").read_text()
    assert "padding: none" in log and "tied embeddings" in log, log[-2000:]
    return converted_tiny_dir


def test_converted_checkpoint_is_self_contained(converted, expanded_tiny_dir):
    assert (converted / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert (converted / "iter_0000000" / ".metadata").is_file()  # torch_dist
    assert TokenLayout.load(converted).layout_hash == LAYOUT.layout_hash
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "token_layout.json"):
        assert (converted / "hf" / name).read_bytes() == (expanded_tiny_dir / name).read_bytes(), name
    record = json.loads((converted / "conversion.json").read_text())
    assert record["padded_vocab_size"] == record["vocab_size"] == 193_792 and record["tied_embeddings"]
    _no_partial_dirs(converted.parent)


def test_roundtrip_fp32_is_exact(converted, expanded_tiny_dir, tmp_path):
    out = tmp_path / "hf"
    log = _cli("megatron_to_hf", "--input", converted, "--output", out, "--dtype", "fp32", "--verify")
    diff = float(re.search(r"max abs logit difference ([0-9.e+-]+)", log).group(1))
    assert diff <= 1e-5 and "PASS" in log, log[-2000:]  # Megatron vs HF, fp32: measured ~5e-7

    a, b = _weights(expanded_tiny_dir), _weights(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    assert json.loads((out / "config.json").read_text()) == json.loads((expanded_tiny_dir / "config.json").read_text())
    ids = torch.tensor(np.concatenate([LAYOUT.tts_document([791, 4062], [5, 6, 7]), LAYOUT.audio_document([9, 8])]))[None]
    with torch.no_grad():
        ref, got = _hf(expanded_tiny_dir)(ids).logits, _hf(out)(ids).logits
    assert (ref - got).abs().max().item() <= 1e-6
    model = _hf(out)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert LAYOUT.check_tokenizer(out) == "expanded" and TokenLayout.load(out).layout_hash == LAYOUT.layout_hash
    gen = json.loads((out / "generation_config.json").read_text())
    assert LAYOUT.speech_end_id in gen["eos_token_id"] and gen["pad_token_id"] == LAYOUT.pad_id
    _no_partial_dirs(tmp_path)


# --- a model that learned one TTS document, through a TP 2 checkpoint with vocabulary padding ------
TEXT_IDS = [791, 4062, 14198, 39935, 927]
CODES = [(37 * i + 11) % 65_536 for i in range(12)]


@pytest.fixture(scope="module")
def memorised_hf(expanded_tiny_dir, tmp_path_factory) -> Path:
    """expanded_tiny_dir trained (plain PyTorch on the HF model: Megatron on 2 CPU cores is too slow to
    memorise in a test) on one repeated TTS document until it reproduces it greedily."""
    model = _hf(expanded_tiny_dir).train()
    doc = torch.tensor(LAYOUT.tts_document(TEXT_IDS, CODES), dtype=torch.long)[None]
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = model(doc, labels=doc).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
    out = tmp_path_factory.mktemp("memorised") / "hf"
    model.eval().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "token_layout.json"):
        shutil.copyfile(expanded_tiny_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def tp2_export(memorised_hf, tmp_path_factory) -> tuple[Path, Path]:
    """memorised_hf -> Megatron at TP 2 (two processes, gloo), padded as a TP 2 run with
    make_vocab_size_divisible_by 512 pads (to 194,560 rows) -> HF from one process."""
    root = tmp_path_factory.mktemp("tp2")
    ckpt, out = root / "ckpt", root / "hf"
    rc, log = run_torchrun(2, ["conversion/hf_to_megatron.py", "--input", str(memorised_hf), "--output", str(ckpt),
                               "--tp", "2", "--vocab-divisible-by", "512"], root / "import.log")
    assert rc == 0, log[-4000:]
    assert log.count("converted HF -> Megatron") == 1  # printed by rank 0 only
    _cli("megatron_to_hf", "--input", ckpt, "--output", out, "--dtype", "fp32")
    return ckpt, out


def test_tp2_padded_checkpoint_exports_from_one_process(tp2_export, memorised_hf):
    ckpt, out = tp2_export
    record = json.loads((ckpt / "conversion.json").read_text())
    assert (record["tp"], record["padded_vocab_size"]) == (2, 194_560)
    assert (ckpt / "iter_0000000" / "__1_0.distcp").is_file()  # written by both ranks
    a, b = _weights(memorised_hf), _weights(out)
    assert b["model.embed_tokens.weight"].shape[0] == 193_792  # padding stripped
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_exported_model_speaks_and_stops_at_speech_end(tp2_export):
    _, out = tp2_export
    model = _hf(out)
    prompt = torch.tensor(LAYOUT.tts_prompt(TEXT_IDS), dtype=torch.long)[None]
    gen = model.generate(prompt, max_new_tokens=40, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert gen[-1] == LAYOUT.speech_end_id, gen  # stopped there, well before max_new_tokens
    speech = np.array(gen[:-1])
    assert is_speech(speech).all(), gen  # codec-range ids only
    assert ids_to_codes(speech).tolist() == CODES


# --- a checkpoint after a few training steps -------------------------------------------------------
@pytest.fixture(scope="module")
def tts_dataset(tmp_path_factory) -> str:
    """An indexed dataset (megatron-core's builder) of TTS documents in the expanded vocabulary."""
    code = ("from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder\n"
            "import numpy as np, sys\nfrom speechlm.token_layout import TokenLayout\n"
            "layout, rng = TokenLayout(), np.random.default_rng(0)\n"
            "b = IndexedDatasetBuilder(sys.argv[1] + '.bin', dtype=np.int32)\n"
            "for _ in range(200):\n"
            "    d = layout.tts_document(rng.integers(1000, 120000, 6), rng.integers(0, 65536, 20))\n"
            "    b.add_document(d, [len(d)])\n"
            "b.finalize(sys.argv[1] + '.idx')\n")
    prefix = str(tmp_path_factory.mktemp("data") / "tts")
    subprocess.run([sys.executable, "-c", code, prefix], cwd=REPO, check=True, timeout=300, env=_env())
    return prefix


@pytest.fixture(scope="module")
def trained(converted, tts_dataset, tmp_path_factory) -> Path:
    """speechlm.train with the smoke recipe for 6 iterations, starting from the converted checkpoint."""
    root = tmp_path_factory.mktemp("train")
    ckpt = root / "ckpt"
    rc, log = run_torchrun(1, ["-m", "speechlm.train", "--config", "recipes/smoke.yaml",
                               f"speechlm.hf_model={converted / 'hf'}", f"dataset.blend=[[{tts_dataset}],null]",
                               "speechlm.blend=null", "dataset.split=90,5,5",
                               f"checkpoint.save={ckpt}", f"checkpoint.pretrained_checkpoint={converted}",
                               "train.train_iters=6", "checkpoint.save_interval=3", "validation.eval_interval=100"],
                           root / "train.log")
    assert rc == 0, log[-4000:]
    assert "successfully loaded checkpoint from" in log and str(converted) in log  # started from the conversion
    return ckpt


def test_trained_checkpoint_exports_and_verifies(trained, expanded_tiny_dir, tmp_path):
    out = tmp_path / "hf"
    log = _cli("megatron_to_hf", "--input", trained, "--output", out, "--verify")  # bf16, latest iteration
    assert "(iteration 6)" in log and "PASS" in log, log[-2000:]
    a, b = _weights(expanded_tiny_dir), _weights(out)
    assert all(v.dtype == torch.bfloat16 for v in b.values())
    changed = [k for k in a if not torch.equal(a[k].to(torch.bfloat16), b[k])]
    assert len(changed) == len(a), sorted(set(a) - set(changed))  # every tensor moved
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert TokenLayout.load(out).layout_hash == LAYOUT.layout_hash


def test_unknown_iteration_lists_the_available_ones(trained, tmp_path):
    err = _cli("megatron_to_hf", "--input", trained, "--output", tmp_path / "x", "--iteration", "4", expect=2)
    assert "no iteration 4; available: 3, 6" in err
    assert not (tmp_path / "x").exists()


# --- refusals --------------------------------------------------------------------------------------
@pytest.fixture
def ckpt_copy(converted, tmp_path) -> Path:
    """The converted checkpoint without its weights (the layout checks come before loading them)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(converted, dst, ignore=shutil.ignore_patterns("*.distcp"))
    return dst


def _check(ckpt: Path):
    from speechlm.model.conversion import check_checkpoint_layout, find_hf_source, resolve_iteration

    root, iter_dir, _ = resolve_iteration(ckpt)
    return check_checkpoint_layout(root, iter_dir, find_hf_source(root, iter_dir))


def test_layout_mismatch_with_the_checkpoint_is_refused(ckpt_copy, tmp_path):
    other = TokenLayout(language_tags=True)
    other.save(ckpt_copy)  # the checkpoint claims another layout than its tokenizer/model's
    with pytest.raises(LayoutMismatchError) as e:
        _check(ckpt_copy)
    msg = str(e.value)
    assert other.layout_hash in msg and LAYOUT.layout_hash in msg and "language_tags" in msg, msg
    err = _cli("megatron_to_hf", "--input", ckpt_copy, "--output", tmp_path / "x", expect=2)
    assert other.layout_hash in err and not (tmp_path / "x").exists()


def test_layout_mismatch_with_the_tokenizer_is_refused(ckpt_copy, tiny_llama_dir):
    shutil.copyfile(tiny_llama_dir / "tokenizer.json", ckpt_copy / "hf" / "tokenizer.json")  # unexpanded
    with pytest.raises(LayoutMismatchError, match=rf"token layout {LAYOUT.layout_hash} .*disagrees with the tokenizer .*hf/tokenizer.json"):
        _check(ckpt_copy)


def test_layout_mismatch_with_the_model_is_refused(ckpt_copy):
    run_config = ckpt_copy / "iter_0000000" / "run_config.yaml"
    run_config.write_text(run_config.read_text().replace("vocab_size: 193792", "vocab_size: 128256"))
    with pytest.raises(LayoutMismatchError, match=r"has 193792 tokens but the checkpoint's model .* vocab_size 128256"):
        _check(ckpt_copy)


def test_unexpanded_model_is_refused(tiny_llama_dir, tmp_path):
    err = _cli("hf_to_megatron", "--input", tiny_llama_dir, "--output", tmp_path / "x", expect=2)
    assert "token_layout.json" in err and "expand" in err
    assert not (tmp_path / "x").exists()


def test_cli_help():
    for script in ("hf_to_megatron", "megatron_to_hf"):
        out = _cli(script, "--help")
        assert "--input" in out and "--output" in out


def test_training_provenance_mismatch_is_refused(trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt, ignore=shutil.ignore_patterns("*.distcp"))
    provenance = ckpt / "iter_0000006" / "provenance.json"  # written by speechlm.train
    record = json.loads(provenance.read_text())
    assert record["layout_hash"] == LAYOUT.layout_hash
    other = TokenLayout(language_tags=True).layout_hash
    provenance.write_text(json.dumps({**record, "layout_hash": other}))
    with pytest.raises(LayoutMismatchError, match=rf"trained with token layout {other} .* is {LAYOUT.layout_hash}"):
        _check(ckpt)
