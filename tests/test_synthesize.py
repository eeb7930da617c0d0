"""python -m speechlm.synthesize: prompt format, rejection of non-code tokens, batch resume, and
speaking held-out sentences with the model the demo pipeline trained (the `demo_run` fixture)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import webdataset as wds
from megatron.core.datasets.indexed_dataset import IndexedDataset

from conftest import REPO
from speechlm.demo import synthetic_codec
from speechlm import token_layout as tl
from speechlm.synthesize.synthesizer import (Item, Reference, SynthesisError, Synthesizer, load_reference, read_batch,
                                             split_generated)
from speechlm.token_layout import TokenLayout


def synthesize(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "speechlm.synthesize", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_prompt_is_the_training_documents_prefix(expanded_tiny_dir, tmp_path):
    """The prompt equals what build_speech.py writes before the first code, byte for byte,
    including the transcript's stripping and characters that look like special tokens."""
    texts = {"hi": "  नमस्ते दुनिया, आज मौसम अच्छा है। ", "ta": "வணக்கம் <|end_of_text|> உலகம்", "en": "Hello there."}
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as sink:
        for i, (lang, text) in enumerate(texts.items()):
            sink.write({"__key__": f"k{i}", "codes.npy": np.arange(5, dtype=np.int32) + 100 * i,
                        "json": {"text": text, "language": lang}})
    out = tmp_path / "tts"
    subprocess.run([sys.executable, "data_prep/build_speech.py", "--input", str(tmp_path / "shard-000000.tar"),
                    "--model", str(expanded_tiny_dir), "--output", str(out), "--kind", "tts", "--valid-fraction", "0",
                    "--quiet"], cwd=REPO, check=True)
    synth = Synthesizer(expanded_tiny_dir, device="cpu")
    for i, (lang, text) in enumerate(texts.items()):
        dataset = IndexedDataset(str(out / f"tts_{lang}_train"))
        doc = np.array(dataset[0])  # a copy: the item is a view of the dataset's mmap
        prompt = synth.prompt(Item(f"k{i}", text.strip(), lang))
        assert np.array_equal(doc[: len(prompt)], prompt), lang
        assert tl.is_speech(doc[len(prompt):len(prompt) + 1]).all()
        assert prompt[-1] == synth.layout.speech_start_id and prompt[0] == tl.BOS_ID



def test_cloning_prompt_is_the_training_documents_prefix(expanded_tiny_dir, tmp_path):
    """With a reference utterance the prompt is the TTS document of `reference transcript + " " +
    text` (as build_speech.py writes it) up to and including the reference's codes, exactly."""
    cases = {"hi": ("नमस्ते दुनिया।", "आज मौसम अच्छा है।"), "ta": ("வணக்கம்", "உலகம் <|s_12|> பெரியது"),
             "en": ("Hello there.", "How are you?")}
    rng = np.random.default_rng(0)
    refs = {lang: rng.integers(0, tl.CODEC_SIZE, size=7 + i) for i, lang in enumerate(cases)}
    targets = {lang: rng.integers(0, tl.CODEC_SIZE, size=5) for lang in cases}
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as sink:
        for i, (lang, (ref_text, text)) in enumerate(cases.items()):
            sink.write({"__key__": f"k{i}", "codes.npy": np.concatenate([refs[lang], targets[lang]]).astype(np.int32),
                        "json": {"text": f"{ref_text} {text}", "language": lang}})
    out = tmp_path / "tts"
    subprocess.run([sys.executable, "data_prep/build_speech.py", "--input", str(tmp_path / "shard-000000.tar"),
                    "--model", str(expanded_tiny_dir), "--output", str(out), "--kind", "tts", "--valid-fraction", "0",
                    "--quiet"], cwd=REPO, check=True)
    synth = Synthesizer(expanded_tiny_dir, device="cpu")
    for lang, (ref_text, text) in cases.items():
        dataset = IndexedDataset(str(out / f"tts_{lang}_train"))
        doc = np.array(dataset[0])  # a copy while the dataset (its mmap) is alive
        prompt = synth.prompt(Item("x", text, lang, Reference(ref_text, refs[lang].astype(np.int32), "ref.npy")))
        assert np.array_equal(doc[: len(prompt)], prompt), lang
        # It ends with the reference's codes; the target's codes come next in the training document.
        assert np.array_equal(tl.ids_to_codes(prompt[-len(refs[lang]):]), refs[lang]), lang
        assert np.array_equal(tl.ids_to_codes(doc[len(prompt):len(prompt) + 5]), targets[lang]), lang


def test_cloning_outputs_only_new_codes_and_refuses_bad_references(expanded_tiny_dir, tmp_path):
    ref = tmp_path / "ref.npy"
    np.save(ref, np.arange(40, dtype=np.int32))
    out = tmp_path / "o"
    r = synthesize("--model", str(expanded_tiny_dir), "--text", "how are you", "--language", "en", "--out", str(out),
                   "--prompt-codes", str(ref), "--prompt-text", "hello there", "--max-new-tokens", "6",
                   "--temperature", "1.0", "--top-k", "0", "--top-p", "1.0")
    assert r.returncode == 0, r.stderr[-2000:]
    stats = json.loads((out / "utt.json").read_text())
    codes = np.load(out / "utt.npy")
    # Only what the model generated (at most 6 tokens), none of the reference's 40 codes.
    assert stats["tokens_generated"] <= 6 and len(codes) == stats["codes"] <= 6
    assert stats["reference"] == {"codes": 40, "text": "hello there", "source": str(ref)}
    assert stats["prompt_tokens"] > 40

    def refused(*args: str) -> str:
        r = synthesize("--model", str(expanded_tiny_dir), "--text", "how are you", "--language", "en",
                       "--out", str(tmp_path / "never"), *args)
        assert r.returncode == 2 and not (tmp_path / "never").exists(), (r.returncode, r.stderr[-2000:])
        return r.stderr

    assert "has no transcript" in refused("--prompt-codes", str(ref))
    # Bad references, each refused with its message (in-process: the same functions the CLI calls).
    for codes, message in ((np.array([5, 65_536]), "code 65536 is outside 0..65535"),
                           (np.array([-1, 3]), "code -1 is outside"),
                           (np.array([1.5, 2.0]), "integer array"), (np.zeros(0, np.int32), "non-empty")):
        bad = tmp_path / "bad.npy"
        np.save(bad, codes)
        with pytest.raises(SynthesisError, match=message):
            load_reference(bad, "hello", "u1")
    with pytest.raises(SynthesisError, match="cannot read reference codes"):
        load_reference(tmp_path / "missing.npy", "hello", "u1")
    with pytest.raises(SynthesisError, match="needs its reference codes"):
        load_reference(None, "hello", "u1")
    synth = Synthesizer(expanded_tiny_dir, device="cpu")
    long_ref = Reference("hello", np.zeros(synth.max_positions - 20, np.int32), "long.npy")
    with pytest.raises(SynthesisError, match="use a shorter reference"):
        synth.check([Item("u1", "how are you", "en", long_ref)], 10.0, None)
    # A batch names its references per line, relative to the jsonl file.
    batch = tmp_path / "items.jsonl"
    batch.write_text(json.dumps({"id": "c1", "text": "how are you", "language": "en", "prompt_codes": "ref.npy",
                                 "prompt_text": "hello there"}) + "\n"
                     + json.dumps({"id": "c2", "text": "fine", "language": "en", "prompt_codes": "ref.npy"}) + "\n")
    with pytest.raises(SynthesisError) as e:
        read_batch(batch)
    assert "items.jsonl:2:" in str(e.value) and "no transcript" in str(e.value) and "items.jsonl:1:" not in str(e.value)
    batch.write_text(batch.read_text().splitlines()[0] + "\n")
    (item,) = read_batch(batch)
    assert item.reference.text == "hello there" and item.reference.codes.tolist() == list(range(40))

def test_split_generated_rejects_and_counts_non_codes():
    layout = TokenLayout()
    c = tl.CODEC_OFFSET
    ids = np.array([c + 5, 42, c + 65_535, layout.pad_id, tl.EOD_ID, c, layout.speech_end_id, c + 9, 17])
    r = split_generated(ids, layout)
    assert r["codes"].dtype == np.int32 and r["codes"].tolist() == [5, 65_535, 0]
    assert r["rejected"] == 3 and r["stop"] == "speech_end" and r["tokens_generated"] == 7
    r = split_generated(np.array([c + 1, 99, c + 2]), layout)
    assert r["codes"].tolist() == [1, 2] and r["rejected"] == 1 and r["stop"] == "max_new_tokens"


def test_bad_batch_input_is_refused_with_line_numbers(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "ok", "language": "hi"}\n{"id": "a", "text": "dup", "language": "hi"}\n'
                   '{"id": "b/c", "text": "x", "language": "hi"}\n{"id": "d", "text": "  ", "language": "hi"}\n'
                   '{"id": "e", "text": "x", "language": "xx"}\nnot json\n')
    with pytest.raises(SynthesisError) as e:
        read_batch(bad)
    msg = str(e.value)
    for line, what in ((2, "duplicate id"), (3, "id 'b/c'"), (4, "empty text"), (5, "unknown language"), (6, "")):
        assert f"bad.jsonl:{line}:" in msg and what in msg
    assert "bad.jsonl:1:" not in msg


def test_untrained_model_output_is_filtered_and_batch_resumes(expanded_tiny_dir, tmp_path):
    """A random model emits mostly text tokens: they are rejected and counted. A batch run killed
    midway resumes without redoing finished items."""
    items = [{"id": f"u{i}", "text": f"sentence number {i}", "language": "en"} for i in range(6)]
    batch = tmp_path / "items.jsonl"
    batch.write_text("".join(json.dumps(x) + "\n" for x in items))
    out = tmp_path / "out"
    args = ["--model", str(expanded_tiny_dir), "--batch", str(batch), "--out", str(out), "--batch-size", "1",
            "--max-new-tokens", "40", "--temperature", "1.0", "--top-k", "0", "--top-p", "1.0"]
    proc = subprocess.Popen([sys.executable, "-m", "speechlm.synthesize", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(list(out.glob("*.json"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("u*.json")}
    assert 2 <= len(done_before) < len(items), "the run was not interrupted midway"
    r = synthesize(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming: {len(done_before)} of {len(items)} items already done" in r.stdout
    for name, mtime in done_before.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was redone"
    assert sorted(p.stem for p in out.glob("u*.npy")) == [x["id"] for x in items]
    assert not list(out.glob("*.partial"))
    total_rejected = 0
    for x in items:
        stats = json.loads((out / f"{x['id']}.json").read_text())
        codes = np.load(out / f"{x['id']}.npy")
        assert codes.dtype == np.int32 and ((codes >= 0) & (codes < tl.CODEC_SIZE)).all()
        assert stats["codes"] == len(codes) and stats["codes"] + stats["rejected"] + (stats["stop"] == "speech_end") == stats["tokens_generated"]
        total_rejected += stats["rejected"]
    assert total_rejected > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items"] == len(items) and summary["rejected"] == total_rejected
    assert "no --codec directory given: writing codes only" in r.stdout


def test_cli_refuses_bad_arguments(expanded_tiny_dir, tmp_path):
    r = synthesize("--model", str(expanded_tiny_dir), "--text", "hello", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--text needs --language" in r.stderr
    r = synthesize("--model", str(tmp_path), "--text", "hello", "--language", "en", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "token_layout.json" in r.stderr
    r = synthesize("--model", str(expanded_tiny_dir), "--text", "hello", "--language", "en", "--out", str(tmp_path / "o"),
                   "--top-p", "0")
    assert r.returncode == 2 and "top-p" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_trained_model_speaks_held_out_sentences(demo_run, tmp_path):
    """The model the demo pipeline trained, asked through the CLI for held-out sentences (single
    and batch), produces the synthetic codec's codes."""
    raw, export = demo_run.work / "raw", demo_run.work / "export"
    items = [json.loads(line) for line in (raw / "heldout.jsonl").read_text().splitlines()][::4]
    expected = json.loads((raw / "heldout_codes.json").read_text())
    batch = tmp_path / "items.jsonl"
    batch.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
    r = synthesize("--model", str(export), "--batch", str(batch), "--out", str(tmp_path / "b"), "--temperature", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    got = {x["id"]: np.load(tmp_path / "b" / f"{x['id']}.npy").tolist() for x in items}
    score = synthetic_codec.token_accuracy({x["id"]: expected[x["id"]] for x in items}, got)
    assert score["accuracy"] >= 0.9, score
    one = items[0]
    r = synthesize("--model", str(export), "--text", one["text"], "--language", one["language"], "--id", "single",
                   "--out", str(tmp_path / "s"), "--temperature", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.load(tmp_path / "s" / "single.npy").tolist() == got[one["id"]]  # batched == alone
    stats = json.loads((tmp_path / "s" / "single.json").read_text())
    assert stats["rtf"] > 0 and stats["audio_seconds"] == len(got[one["id"]]) / tl.CODES_PER_SECOND
    assert "RTF" in r.stdout and "codes =" in r.stdout
