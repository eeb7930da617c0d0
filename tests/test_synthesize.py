"""python -m speechlm.synthesize: prompt format, rejection of non-code tokens, batch resume, and
speaking held-out sentences with the model the demo pipeline trained (the `demo_run` fixture)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
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
    with pytest.raises(SynthesisError, match="needs its reference: --prompt-codes / prompt_codes or --prompt-wav"):
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



def test_cloning_from_a_wav_encodes_it_once_and_refuses_bad_recordings(expanded_tiny_dir, tmp_path, monkeypatch, capsys):
    """--prompt-wav / prompt_wav end to end on the tiny model, through `main` in this process: the
    real xcodec2_encoder.load reads a real checkpoint written from a random encoder, but with a small
    semantic model (17 layers of width 32; w2v-BERT 2.0's full size would need a 2.5 GB file), which
    only an in-process run can pass to it. The recording's codes then act exactly as --prompt-codes."""
    from safetensors.torch import save_file
    from test_xcodec2 import _varied, _write_wav, small_semantic_config

    from speechlm.synthesize import synthesizer, xcodec2_encoder

    encoder = _varied(xcodec2_encoder.random_encoder(seed=1, semantic_config=small_semantic_config()))
    codec = tmp_path / "xcodec2"
    codec.mkdir()
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(codec / "model.safetensors"))
    loads = []
    real_load = xcodec2_encoder.load

    def load(codec_dir, device="cpu"):
        loads.append(codec_dir)
        return real_load(codec_dir, device, semantic_config=small_semantic_config())

    monkeypatch.setattr(xcodec2_encoder, "load", load)
    # Decoding is test_xcodec2's; this checkpoint holds no decoder weights, and xcodec2_decoder.load
    # would build its 187M parameters on every run only to say so.
    monkeypatch.setattr(synthesizer, "load_codec", lambda codec_dir, device: None)
    t = np.arange(int(22_050 * 0.6)) / 22_050  # 0.6 s, 22.05 kHz stereo: read_wav resamples and mixes it
    tone = np.round(np.sin(2 * np.pi * 180 * t) * 12_000)
    wav = _write_wav(tmp_path / "ref.wav", np.stack([tone, tone / 2], 1), 22_050, 2)
    expected = encoder.encode(synthesizer.read_wav(wav))
    assert len(expected) == 31 and len(np.unique(expected)) > 3  # 9,600 samples at 16 kHz: 30 codes + upstream's pad
    common = ["--model", str(expanded_tiny_dir), "--text", "how are you", "--language", "en", "--max-new-tokens", "6",
              "--temperature", "0"]

    def run(*args: str) -> int:
        capsys.readouterr()
        return synthesizer.main([*common, *args])

    assert run("--out", str(tmp_path / "w"), "--prompt-wav", str(wav), "--prompt-text", "hello there",
               "--codec", str(codec)) == 0, capsys.readouterr().err
    stats = json.loads((tmp_path / "w" / "utt.json").read_text())
    assert stats["reference"] == {"codes": len(expected), "text": "hello there", "source": str(wav)}
    codes = np.load(tmp_path / "w" / "utt.npy")
    assert len(codes) == stats["codes"] <= stats["tokens_generated"] <= 6  # only new codes, none of the 31
    assert stats["prompt_tokens"] > len(expected) and loads == [str(codec)]
    # The same reference given as codes: the same prompt, the same (greedy) output.
    np.save(tmp_path / "ref.npy", expected)
    assert run("--out", str(tmp_path / "c"), "--prompt-codes", str(tmp_path / "ref.npy"), "--prompt-text",
               "hello there") == 0
    as_codes = json.loads((tmp_path / "c" / "utt.json").read_text())
    assert as_codes["prompt_tokens"] == stats["prompt_tokens"]
    assert np.load(tmp_path / "c" / "utt.npy").tolist() == codes.tolist()
    # A batch names recordings per line, relative to the jsonl file; the encoder loads once for all.
    loads.clear()
    batch = tmp_path / "items.jsonl"
    batch.write_text("".join(json.dumps({"id": f"b{i}", "text": "how are you", "language": "en", "prompt_wav": "ref.wav",
                                         "prompt_text": "hello there"}) + "\n" for i in range(2)))
    assert synthesizer.main(["--model", str(expanded_tiny_dir), "--batch", str(batch), "--out", str(tmp_path / "b"),
                             "--max-new-tokens", "6", "--temperature", "0", "--codec", str(codec)]) == 0
    assert loads == [str(codec)]
    for i in range(2):
        assert json.loads((tmp_path / "b" / f"b{i}.json").read_text())["reference"]["source"] == str(tmp_path / "ref.wav")
        assert np.load(tmp_path / "b" / f"b{i}.npy").tolist() == codes.tolist()

    def refused(*args: str) -> str:
        assert run("--out", str(tmp_path / "never"), *args) == 2
        assert not (tmp_path / "never").exists()
        return capsys.readouterr().err

    (tmp_path / "junk.wav").write_bytes(b"RIFF? no")
    assert "cannot read" in refused("--prompt-wav", str(tmp_path / "junk.wav"), "--prompt-text", "hi", "--codec", str(codec))
    assert "has no transcript" in refused("--prompt-wav", str(wav), "--codec", str(codec))
    assert "needs --codec DIR" in refused("--prompt-wav", str(wav), "--prompt-text", "hi")
    (tmp_path / "decoder-only").mkdir()
    save_file({"fc_post_a.weight": torch.zeros(2, 2)}, str(tmp_path / "decoder-only" / "model.safetensors"))
    err = refused("--prompt-wav", str(wav), "--prompt-text", "hi", "--codec", str(tmp_path / "decoder-only"))
    assert "XCodec2 encoder of --codec" in err and "encoder weights missing" in err
    with pytest.raises(SystemExit) as e:  # argparse: the two kinds of reference exclude each other
        run("--out", str(tmp_path / "never"), "--prompt-wav", str(wav), "--prompt-codes", str(tmp_path / "ref.npy"))
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    # A batch's problems come together, with line numbers; nothing is generated.
    batch.write_text(json.dumps({"id": "x1", "text": "hi", "language": "en", "prompt_wav": "ref.wav",
                                 "prompt_codes": "ref.npy", "prompt_text": "hello"}) + "\n"
                     + json.dumps({"id": "x2", "text": "hi", "language": "en", "prompt_wav": "junk.wav",
                                   "prompt_text": "hello"}) + "\n"
                     + json.dumps({"id": "x3", "text": "hi", "language": "en", "prompt_wav": "ref.wav"}) + "\n")
    assert synthesizer.main(["--model", str(expanded_tiny_dir), "--batch", str(batch), "--out", str(tmp_path / "never"),
                             "--codec", str(codec)]) == 2
    err = capsys.readouterr().err
    assert "items.jsonl:1: x1: give the reference as codes or as a recording, not both" in err
    assert "items.jsonl:2: x2: cannot read" in err and "items.jsonl:3: x3: the reference" in err
    assert not (tmp_path / "never").exists()

@pytest.mark.slow
def test_trained_model_speaks_held_out_sentences(demo_run, tmp_path):
    """The model the demo pipeline trained, asked through the CLI for held-out sentences (single
    and batch, with and without a reference voice), says the right words (read back with the
    synthetic codec) and, prompted with a reference, in the reference speaker's voice."""
    raw, export = demo_run.work / "raw", demo_run.work / "export"
    items = [json.loads(line) for line in (raw / "heldout.jsonl").read_text().splitlines()][::4]
    answers = json.loads((raw / "heldout_answers.json").read_text())
    for x in items:  # the batch file lives elsewhere: reference paths made absolute
        if "prompt_codes" in x:
            x["prompt_codes"] = str(raw / x["prompt_codes"])
    assert any("prompt_codes" in x for x in items) and any("prompt_codes" not in x for x in items)
    batch = tmp_path / "items.jsonl"
    batch.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
    r = synthesize("--model", str(export), "--batch", str(batch), "--out", str(tmp_path / "b"), "--temperature", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    got = {x["id"]: np.load(tmp_path / "b" / f"{x['id']}.npy").tolist() for x in items}
    score = synthetic_codec.speech_scores(synthetic_codec.SyntheticCodec(), {x["id"]: answers[x["id"]] for x in items}, got)
    assert score["content_accuracy"] >= 0.9 and score["cloning_accuracy"] >= 0.9, score
    one = items[0]
    r = synthesize("--model", str(export), "--text", one["text"], "--language", one["language"], "--id", "single",
                   "--out", str(tmp_path / "s"), "--temperature", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.load(tmp_path / "s" / "single.npy").tolist() == got[one["id"]]  # batched == alone
    stats = json.loads((tmp_path / "s" / "single.json").read_text())
    assert stats["rtf"] > 0 and stats["audio_seconds"] == len(got[one["id"]]) / tl.CODES_PER_SECOND
    assert "RTF" in r.stdout and "codes =" in r.stdout
    clone = next(x for x in items if "prompt_codes" in x)
    r = synthesize("--model", str(export), "--text", clone["text"], "--language", clone["language"], "--id", "clone",
                   "--prompt-codes", clone["prompt_codes"], "--prompt-text", clone["prompt_text"],
                   "--out", str(tmp_path / "c"), "--temperature", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.load(tmp_path / "c" / "clone.npy").tolist() == got[clone["id"]]  # batched == alone
