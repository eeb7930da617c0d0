"""The XCodec2 decode path (speechlm.synthesize.xcodec2_decoder) with the real xcodec2 package and random weights.

One 187M-parameter decoder is built for the module (~2 s); decoding on CPU takes seconds per
second of audio, so the checkpoint round trips compare short code sequences.
"""

from __future__ import annotations

import sys
import wave

import numpy as np
import pytest
import torch

from speechlm.synthesize import synthesizer as synthesize, xcodec2_decoder
from speechlm.synthesize.xcodec2_decoder import SAMPLES_PER_CODE, CodecUnavailable

SEMANTIC_KEY = "semantic_model.encoder.layers.0.ffn1.intermediate_dense.weight"  # as in the real checkpoint
WINDOW_KEY = "generator.head.istft.window"


@pytest.fixture(scope="module")
def decoder():
    return xcodec2_decoder.random_decoder(seed=0)


@pytest.fixture(scope="module")
def state_dict(decoder):
    return {k: v.detach().clone().contiguous() for k, v in decoder.state_dict().items()}


@pytest.fixture(scope="module")
def decoded(decoder):
    """T -> (codes, samples) for the lengths of the brief: one decode each, shared."""
    rng = np.random.default_rng(0)
    out = {}
    for t in (50, 73):
        codes = rng.integers(0, 65_536, size=t).astype(np.int32)
        out[t] = codes, decoder.decode(codes)
    return out


@pytest.fixture(scope="module")
def short_codes():
    return np.random.default_rng(1).integers(0, 65_536, size=8).astype(np.int32)


def _save_safetensors(path, tensors):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


@pytest.mark.parametrize("t", [50, 73])
def test_random_decoder_decodes_320_samples_per_code(decoded, t):
    codes, samples = decoded[t]
    assert samples.dtype == np.float32
    assert samples.shape == (SAMPLES_PER_CODE * t,)
    assert np.isfinite(samples).all()
    assert samples.std() > 0


def test_decode_matches_upstream_decode_code(decoder, short_codes):
    """forward is XCodec2Model.decode_code's computation (run here on our submodules)."""
    from xcodec2.modeling_xcodec2 import XCodec2Model  # importing it downloads nothing

    codes = torch.from_numpy(short_codes.astype(np.int64)).view(1, 1, -1)
    upstream = XCodec2Model.decode_code(decoder, codes).reshape(-1).numpy()
    np.testing.assert_allclose(decoder.decode(short_codes), upstream, rtol=0, atol=1e-6)


def test_decode_rejects_bad_codes(decoder):
    with pytest.raises(ValueError, match="outside 0..65535"):
        decoder.decode(np.array([0, 65_536], np.int32))
    with pytest.raises(ValueError, match="1-D integer"):
        decoder.decode(np.zeros((2, 3), np.int32))
    assert decoder.decode(np.zeros(0, np.int32)).shape == (0,)


def test_load_safetensors_checkpoint(decoder, state_dict, short_codes, tmp_path):
    """A checkpoint laid out like HKUSTAudio/xcodec2's model.safetensors: the decoder's keys and others."""
    _save_safetensors(tmp_path / "xcodec2" / "model.safetensors",
                      {**state_dict, SEMANTIC_KEY: torch.zeros(16, 4), "fc_prior.weight": torch.zeros(4, 4)})
    loaded = xcodec2_decoder.load(tmp_path / "xcodec2", "cpu")
    assert not loaded.training
    np.testing.assert_allclose(loaded.decode(short_codes), decoder.decode(short_codes), rtol=0, atol=1e-6)


def test_load_pytorch_model_bin_without_window_buffer(state_dict, tmp_path):
    """pytorch_model.bin also loads; the ISTFT window (a buffer, not a weight) may be absent."""
    (tmp_path / "bin").mkdir()
    torch.save({k: v for k, v in state_dict.items() if k != WINDOW_KEY}, tmp_path / "bin" / "pytorch_model.bin")
    loaded = xcodec2_decoder.load(tmp_path / "bin", "cpu")
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state_dict.items())


def test_load_refuses_checkpoint_without_decoder_weights(state_dict, tmp_path):
    _save_safetensors(tmp_path / "model.safetensors", {SEMANTIC_KEY: torch.zeros(4),
                                                       "fc_post_a.weight": state_dict["fc_post_a.weight"],
                                                       "fc_post_a.bias": state_dict["fc_post_a.bias"]})
    with pytest.raises(CodecUnavailable, match=r"not an XCodec2 checkpoint: \d+ decoder weights missing, e.g. generator\."):
        xcodec2_decoder.load(tmp_path, "cpu")


def test_load_refuses_checkpoint_missing_one_weight(state_dict, tmp_path, monkeypatch):
    """Strict: one decoder weight short is refused, by name (read from memory: no 750 MB file to write)."""
    (tmp_path / "model.safetensors").write_bytes(b"")
    one_missing = {k: v for k, v in state_dict.items() if k != "generator.backbone.embed.weight"}
    monkeypatch.setattr(xcodec2_decoder, "_read_weights", lambda path: dict(one_missing))
    with pytest.raises(CodecUnavailable, match=r"1 decoder weights missing, e.g. generator\.backbone\.embed\.weight$"):
        xcodec2_decoder.load(tmp_path, "cpu")
    shape = {**one_missing, "generator.backbone.embed.weight": torch.zeros(3)}
    monkeypatch.setattr(xcodec2_decoder, "_read_weights", lambda path: dict(shape))
    with pytest.raises(CodecUnavailable, match="does not match XCodec2's decoder.*size mismatch"):
        xcodec2_decoder.load(tmp_path, "cpu")


def test_load_refuses_dir_without_weights(tmp_path):
    with pytest.raises(CodecUnavailable, match="no model.safetensors or pytorch_model.bin"):
        xcodec2_decoder.load(tmp_path, "cpu")
    with pytest.raises(CodecUnavailable, match="not a directory"):
        xcodec2_decoder.load(tmp_path / "absent", "cpu")


def test_missing_package_is_codec_unavailable(tmp_path, monkeypatch, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "xcodec2.vq.codec_decoder_vocos", None)  # import raises ImportError
    with pytest.raises(CodecUnavailable, match="does not import .*requirements-codec.txt"):
        xcodec2_decoder.load(tmp_path, "cpu")
    assert synthesize.load_codec(str(tmp_path), "cpu") is None
    assert "XCodec2 unavailable" in capsys.readouterr().out


def test_write_wav_of_decoded_audio(decoded, tmp_path):
    codes, samples = decoded[73]
    synthesize.write_wav(tmp_path / "utt.wav", samples)
    with wave.open(str(tmp_path / "utt.wav"), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16_000)
        assert w.getnframes() == SAMPLES_PER_CODE * len(codes)
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    expected = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    np.testing.assert_array_equal(pcm, expected)
