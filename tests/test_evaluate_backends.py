"""ASR and speaker-similarity backends of checkpoint evaluation (speechlm/evaluate/asr.py, speaker.py).

The synthetic backends against the synthetic codec; the Whisper and x-vector backends for real on
tiny random models (built from configs here, with an offline byte-level BPE Whisper tokenizer),
saved to temporary directories and loaded as local model directories: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from speechlm.demo.synthetic_codec import SyntheticCodec
from speechlm.evaluate import EvaluationError, Utterance, asr, scoring, speaker
from speechlm.synthesize.synthesizer import write_wav
from speechlm.synthesize.xcodec2_decoder import SAMPLE_RATE

WHISPER_SPECIALS = ("<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                    "<|notimestamps|>")


@pytest.fixture(scope="module")
def codec() -> SyntheticCodec:
    return SyntheticCodec()


def _utt(codec: SyntheticCodec, i: int, text: str, language: str, spk: int) -> Utterance:
    return Utterance(f"{language}-{i}-s{spk}", language, codec.codes(text, language, spk))


def _junk(codec: SyntheticCodec, language: str, n: int) -> np.ndarray:
    """Codes that start no run of `language`: read as one unreadable stretch."""
    firsts = {int(run[s][0]) for run in codec.runs[language].values() for s in range(codec.speakers)}
    return np.array([c for c in range(100, 200) if c not in firsts][:n], np.int32)


# --- the synthetic ASR -----------------------------------------------------------------------------


def test_synthetic_asr_recovers_the_words_of_codec_output(codec):
    sentences = codec.sentences(4, seed=11)
    utts = [_utt(codec, i, s.text, s.language, spk) for i, s in enumerate(sentences) for spk in range(codec.speakers)]
    assert {u.language for u in utts} == {"hi", "ta", "en"} and codec.speakers >= 3
    model = asr.load_asr(["synthetic"])
    assert isinstance(model, asr.SyntheticASR) and not model.needs_audio
    assert model.transcribe(utts) == [s.text for s in sentences for _ in range(codec.speakers)]
    assert model.transcribe([]) == []


def test_an_unreadable_stretch_is_one_unk_word_and_costs_an_error(codec):
    words = list(codec.runs["hi"])[:2]
    codes = np.concatenate([codec.runs["hi"][words[0]][1], _junk(codec, "hi", 3), codec.runs["hi"][words[1]][1],
                            _junk(codec, "hi", 1)])
    hyp = asr.SyntheticASR(codec).transcribe([Utterance("x", "hi", codes), Utterance("empty", "hi", codes[:0])])
    assert hyp == [f"{words[0]} <unk> {words[1]} <unk>", ""]
    assert scoring.edits(" ".join(words), hyp[0])["word_edits"] == 2  # <unk> survives normalisation
    with pytest.raises(EvaluationError, match="'bn' is not in the synthetic codec"):
        asr.SyntheticASR(codec).transcribe([Utterance("b", "bn", codes)])


# --- the synthetic speakers and cosine -------------------------------------------------------------


def test_cosine():
    assert speaker.cosine([1, 0], [1, 1]) == pytest.approx(2 ** -0.5)
    assert speaker.cosine(np.array([3.0, 4.0], np.float32), [6, 8]) == pytest.approx(1.0)
    assert speaker.cosine([1, 2], [-1, -2]) == pytest.approx(-1.0)
    assert speaker.cosine([0, 0], [1, 2]) == 0.0 and speaker.cosine([1, 2], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="different sizes"):
        speaker.cosine([1, 2], [1, 2, 3])


def test_synthetic_speakers_rank_the_reference_speaker_first(codec):
    model = speaker.load_speaker_model("synthetic")
    assert isinstance(model, speaker.SyntheticSpeakers) and not model.needs_audio
    for language in codec.languages:
        refs = codec.sentences(1, seed=21)  # one reference sentence per language, spoken by each speaker
        ref = next(s for s in refs if s.language == language)
        ref_emb = model.embed([_utt(codec, 0, ref.text, language, spk) for spk in range(codec.speakers)])
        assert ref_emb.shape == (codec.speakers, codec.speakers) and ref_emb.dtype == np.float32
        tests = [s for s in codec.sentences(3, seed=22) if s.language == language]
        for spk in range(codec.speakers):
            emb = model.embed([_utt(codec, i, s.text, language, spk) for i, s in enumerate(tests)])
            for e in emb:
                sims = [speaker.cosine(e, r) for r in ref_emb]
                assert int(np.argmax(sims)) == spk
                assert sims[spk] == pytest.approx(1.0) and all(x == 0.0 for k, x in enumerate(sims) if k != spk)
    # A stretch of junk counts for nobody; no readable code at all embeds as zeros (cosine 0).
    word = list(codec.runs["ta"])[0]
    mixed = np.concatenate([codec.runs["ta"][word][2], _junk(codec, "ta", 5)])
    emb = model.embed([Utterance("m", "ta", mixed), Utterance("j", "ta", _junk(codec, "ta", 4))])
    assert emb[0].tolist() == [0, 0, len(codec.runs["ta"][word][2]), 0] and not emb[1].any()
    assert speaker.cosine(emb[1], ref_emb[0]) == 0.0
    with pytest.raises(EvaluationError, match="'kn' is not in the synthetic codec"):
        model.embed([Utterance("k", "kn", mixed)])


# --- tiny Whisper models ---------------------------------------------------------------------------


def _whisper_tokenizer(d: Path):
    """A byte-level BPE WhisperTokenizer from a vocab.json written here (the 256 byte symbols; no
    merges: every byte its own token), then Whisper's special tokens in Whisper's order
    (<|endoftext|>, <|startoftranscript|>, the languages, the tasks, <|notimestamps|>)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import AddedToken, WhisperTokenizer
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = WhisperTokenizer(vocab=json.loads((d / "vocab.json").read_text()), merges=[])  # adds <|endoftext|> (256)
    specials = ["<|startoftranscript|>", *(f"<|{code}|>" for code in LANGUAGES), *WHISPER_SPECIALS]
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in specials], special_tokens=True)
    return tok


def make_tiny_whisper(d: Path, seed: int, languages: tuple[str, ...] | None, hub_layout: bool = False) -> Path:
    """A random 1-layer Whisper (d_model 16). `languages`: its generation config's lang_to_id (None:
    a monolingual fine-tune without lang_to_id/task_to_id). hub_layout: tokenizer and
    preprocessor_config.json saved separately, as hub copies have them (else one WhisperProcessor save)."""
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor)

    tok = _whisper_tokenizer(d)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|startoftranscript|>", *WHISPER_SPECIALS)}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_source_positions=1500, max_target_positions=32,
                           pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot)
    model = WhisperForConditionalGeneration(config)
    gen = dict(decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot, max_length=10,
               no_timestamps_token_id=ids["<|notimestamps|>"], begin_suppress_tokens=[eot],
               # Random weights favour special tokens, which decode to nothing: suppressed, it writes text.
               suppress_tokens=list(range(sot, len(tok))))
    if languages is not None:
        gen.update(is_multilingual=True, lang_to_id={f"<|{x}|>": tok.convert_tokens_to_ids(f"<|{x}|>") for x in languages},
                   task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]})
    model.generation_config = GenerationConfig(**gen)
    model.save_pretrained(d)
    features = WhisperFeatureExtractor(feature_size=80)
    if hub_layout:
        features.save_pretrained(d)
        tok.save_pretrained(d)
    else:
        WhisperProcessor(features, tok).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def whisper_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-whisper")
    return {"multi": make_tiny_whisper(root / "multi", seed=1, languages=("en", "hi")),
            "mono": make_tiny_whisper(root / "mono", seed=2, languages=None, hub_layout=True)}


@pytest.fixture(scope="module")
def wavs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("wavs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        t = np.arange(int(SAMPLE_RATE * (0.4 + 0.1 * i))) / SAMPLE_RATE
        write_wav(root / f"{i}.wav", 0.3 * np.sin(2 * np.pi * (200 + 90 * i) * t) + rng.normal(0, 0.02, t.size))
        paths.append(root / f"{i}.wav")
    return paths


def _audio(i: int, language: str, wav: Path | None, n_codes: int = 25) -> Utterance:
    return Utterance(f"{language}-{i}", language, np.zeros(n_codes, np.int32), wav)


def _spy_generate(monkeypatch, model) -> list[dict]:
    """Record each generate call's batch size and keyword arguments, then run it for real."""
    calls, real = [], model.generate

    def generate(features, **kwargs):
        calls.append({"batch": int(features.shape[0]), **kwargs})
        return real(features, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return calls


def test_whisper_transcribes_audio_forcing_the_language_it_knows(whisper_dirs, wavs, monkeypatch, capsys):
    model = asr.WhisperASR(whisper_dirs["multi"], device="cpu", batch_size=2)
    assert model.needs_audio and model.device == "cpu"
    calls = _spy_generate(monkeypatch, model.model)
    utts = [_audio(0, "hi", wavs[0]), _audio(1, "ta", wavs[1]), _audio(2, "hi", wavs[2]), _audio(3, "hi", wavs[3]),
            _audio(4, "en", wavs[4]), _audio(5, "hi", None, n_codes=0)]  # no codes: nothing spoken, no wav
    texts = model.transcribe(utts)
    assert len(texts) == len(utts) and all(isinstance(t, str) for t in texts) and texts[5] == ""
    assert all(texts[:5]) and all("<|" not in t for t in texts)  # text, special tokens skipped
    assert getattr(model.model.generation_config, "language", None) is None  # a forced language does not stick
    # Per language, batch_size clips at a time; hi and en forced, ta (not in lang_to_id) not.
    assert calls == [{"batch": 2, "language": "hi", "task": "transcribe"}, {"batch": 1, "language": "hi", "task": "transcribe"},
                     {"batch": 1}, {"batch": 1, "language": "en", "task": "transcribe"}]
    said = capsys.readouterr().out
    assert said.count("no <|ta|> in its generation config's lang_to_id") == 1 and "<|hi|>" not in said
    # The same clip transcribes the same alone and in a batch, and says so about ta only once.
    assert model.transcribe([utts[3], utts[1]]) == [texts[3], texts[1]]
    assert "lang_to_id" not in capsys.readouterr().out
    # What generate made of the hi clips is the decoded text, specials skipped.
    from speechlm.synthesize.synthesizer import read_wav

    features = model.processor.feature_extractor([read_wav(wavs[0])], sampling_rate=SAMPLE_RATE, return_tensors="pt")
    ids = model.model.generate(features.input_features, language="hi", task="transcribe")
    assert texts[0] == model.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def test_whisper_without_lang_to_id_is_not_forced(whisper_dirs, wavs, monkeypatch, capsys):
    model = asr.WhisperASR(whisper_dirs["mono"], device="cpu")  # the hub layout: preprocessor_config.json
    calls = _spy_generate(monkeypatch, model.model)
    texts = model.transcribe([_audio(0, "hi", wavs[0]), _audio(1, "hi", wavs[1])])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert calls == [{"batch": 2}]
    assert "transcribing hi without forcing the language" in capsys.readouterr().out


def test_whisper_needs_wavs(whisper_dirs, wavs, tmp_path):
    model = asr.WhisperASR(whisper_dirs["mono"], device="cpu")
    with pytest.raises(EvaluationError, match=r"hi-1: no wav to transcribe.*--codec"):
        model.transcribe([_audio(0, "hi", wavs[0]), _audio(1, "hi", None)])
    (tmp_path / "bad.wav").write_text("not a wav")
    with pytest.raises(EvaluationError, match="bad.wav as a wav file"):
        model.transcribe([_audio(0, "hi", tmp_path / "bad.wav")])


def test_the_language_map_picks_each_languages_model_and_loads_it_once(whisper_dirs, wavs, monkeypatch):
    loaded, used = [], []
    real_init, real_transcribe = asr.WhisperASR.__init__, asr.WhisperASR.transcribe

    def init(self, model_dir, *a, **k):
        loaded.append(Path(model_dir).name)
        real_init(self, model_dir, *a, **k)

    def transcribe(self, utts):
        used.append((self.model_dir.name, [u.id for u in utts]))
        return real_transcribe(self, utts)

    monkeypatch.setattr(asr.WhisperASR, "__init__", init)
    monkeypatch.setattr(asr.WhisperASR, "transcribe", transcribe)
    model = asr.load_asr([str(whisper_dirs["multi"]), f"ta={whisper_dirs['mono']}", f"HI={whisper_dirs['mono']}"], "cpu")
    assert model.needs_audio and loaded == []  # checked, not loaded
    utts = [_audio(0, "hi", wavs[0]), _audio(1, "ta", wavs[1]), _audio(2, "en", wavs[2]), _audio(3, "ta", wavs[3])]
    texts = model.transcribe(utts)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    assert used == [("mono", ["hi-0"]), ("mono", ["ta-1", "ta-3"]), ("multi", ["en-2"])]
    assert loaded == ["mono", "multi"]  # mono serves hi and ta: loaded once
    # In order, and what each language's own model says.
    assert texts[1] == model.model_for("ta").transcribe([utts[1]])[0]
    assert texts[2] == model.model_for("en").transcribe([utts[2]])[0]
    model.transcribe(utts)
    assert loaded == ["mono", "multi"]


def test_asr_spec_errors(whisper_dirs, wavs, tmp_path):
    multi, mono = str(whisper_dirs["multi"]), str(whisper_dirs["mono"])
    with pytest.raises(EvaluationError, match=r"nowhere: no such directory \(expected a local Whisper"):
        asr.load_asr([f"hi={tmp_path / 'nowhere'}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="empty: no readable config.json"):
        asr.load_asr([str(tmp_path / "empty")])
    with pytest.raises(EvaluationError, match="model_type 'llama', not whisper"):
        (tmp_path / "llama").mkdir()
        (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
        asr.load_asr([str(tmp_path / "llama")])
    with pytest.raises(EvaluationError, match="no weights"):
        (tmp_path / "cfg-only").mkdir()
        (tmp_path / "cfg-only" / "config.json").write_text((whisper_dirs["multi"] / "config.json").read_text())
        asr.load_asr([str(tmp_path / "cfg-only")])
    with pytest.raises(EvaluationError, match="unknown language 'xx'"):
        asr.load_asr([multi, f"xx={mono}"])
    with pytest.raises(EvaluationError, match="two models for hi"):
        asr.load_asr([f"hi={multi}", f"hi={mono}"])
    with pytest.raises(EvaluationError, match="two models for the default"):
        asr.load_asr([multi, mono])
    with pytest.raises(EvaluationError, match="goes alone"):
        asr.load_asr(["synthetic", f"hi={mono}"])
    with pytest.raises(EvaluationError, match="goes alone"):
        asr.load_asr(["hi=synthetic"])
    with pytest.raises(EvaluationError, match="no ASR given"):
        asr.load_asr([])
    model = asr.load_asr([f"hi={multi}", f"en={multi}"], "cpu")
    with pytest.raises(EvaluationError, match=rf"language\(s\) ta, mr \(--asr hi={multi}, en={multi}\)"):
        model.transcribe([_audio(0, "hi", wavs[0]), _audio(1, "ta", wavs[1]), _audio(2, "mr", wavs[2])])
    with pytest.raises(EvaluationError, match="no ASR model for language 'ta'"):
        model.model_for("ta")
    assert model._models == {}  # the error came before any model loaded


# --- a tiny x-vector model -------------------------------------------------------------------------


def _tiny_wavlm_config():
    from transformers import WavLMConfig

    return WavLMConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16,
                       num_conv_pos_embedding_groups=2, tdnn_dim=(8, 8), tdnn_kernel=(3, 1), tdnn_dilation=(1, 1),
                       xvector_output_dim=6, num_buckets=16, max_bucket_distance=50, feat_extract_norm="layer",
                       do_stable_layer_norm=True)


def _feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=True)


@pytest.fixture(scope="module")
def xvector_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import WavLMForXVector

    d = tmp_path_factory.mktemp("tiny-wavlm-sv")
    torch.manual_seed(0)
    WavLMForXVector(_tiny_wavlm_config()).save_pretrained(d)
    _feature_extractor().save_pretrained(d)
    return d


def test_xvector_speakers_embed_audio(xvector_dir, wavs):
    model = speaker.load_speaker_model(str(xvector_dir), "cpu")
    assert isinstance(model, speaker.XVectorSpeakers) and model.needs_audio
    utts = [_audio(i, "hi", wavs[i]) for i in range(3)]
    emb = model.embed(utts)
    assert emb.shape == (3, 6) and emb.dtype == np.float32 and np.isfinite(emb).all()
    again = model.embed([utts[2], utts[0]])
    np.testing.assert_allclose(again, emb[[2, 0]], rtol=1e-5, atol=1e-6)  # a clip embeds alike in any batch
    assert speaker.cosine(emb[0], again[1]) == pytest.approx(1.0, abs=1e-6)
    assert speaker.cosine(emb[0], emb[1]) < 1 - 1e-6
    assert model.embed([]).shape == (0, 6)
    with pytest.raises(EvaluationError, match=r"hi-1: no wav to embed.*--codec"):
        model.embed([utts[0], _audio(1, "hi", None)])


def test_speaker_model_errors(xvector_dir, whisper_dirs, tmp_path):
    from transformers import WavLMModel

    with pytest.raises(EvaluationError, match="nowhere: no such directory .*x-vector"):
        speaker.load_speaker_model(str(tmp_path / "nowhere"))
    with pytest.raises(EvaluationError, match="model_type 'whisper', not"):
        speaker.load_speaker_model(str(whisper_dirs["multi"]))
    bare = tmp_path / "wavlm-no-head"  # the encoder alone: its x-vector head would be random
    WavLMModel(_tiny_wavlm_config()).save_pretrained(bare)
    _feature_extractor().save_pretrained(bare)
    with pytest.raises(EvaluationError, match="wavlm-no-head: weights missing for"):
        speaker.load_speaker_model(str(bare), "cpu")
    with pytest.raises(EvaluationError, match="model_type 'wavlm', not whisper"):
        asr.load_asr([str(xvector_dir)])  # and an x-vector directory is no ASR
