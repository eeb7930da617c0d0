"""The XCodec2 decode and encode paths (speechlm.synthesize.xcodec2_decoder / xcodec2_encoder)
with the real xcodec2 package and random weights, and the WAV reader that feeds the encoder.

One 187M-parameter decoder is built for the module (~2 s); decoding on CPU takes seconds per
second of audio, so the checkpoint round trips compare short code sequences. The encoder is built
once at w2v-BERT 2.0's full size (the upstream comparison) and otherwise with a small semantic
model (17 layers of width 32), which keeps its checkpoint file small (~160 MB, mostly CodecEnc).
"""

from __future__ import annotations

import sys
import wave

import numpy as np
import pytest
import torch

from speechlm.synthesize import synthesizer as synthesize, xcodec2_decoder, xcodec2_encoder
from speechlm.synthesize.synthesizer import SynthesisError, read_wav
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
    monkeypatch.setattr(xcodec2_decoder, "_read_weights", lambda path, prefixes: dict(one_missing))
    with pytest.raises(CodecUnavailable, match=r"1 decoder weights missing, e.g. generator\.backbone\.embed\.weight$"):
        xcodec2_decoder.load(tmp_path, "cpu")
    shape = {**one_missing, "generator.backbone.embed.weight": torch.zeros(3)}
    monkeypatch.setattr(xcodec2_decoder, "_read_weights", lambda path, prefixes: dict(shape))
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


# --- the encode path (voice cloning from a recording) -------------------------------------------


def small_semantic_config():
    """A w2v-BERT of transformers' own config class, cut down: 17 layers (hidden_states[16] is read)."""
    from transformers import Wav2Vec2BertConfig

    return Wav2Vec2BertConfig(hidden_size=32, num_hidden_layers=17, num_attention_heads=2, intermediate_size=64)


def _varied(encoder):
    """Random init leaves fc_prior's output near 0, where the FSQ quantizer gives one code for every
    frame; scaled up, codes vary from frame to frame, so comparisons of codes can fail."""
    with torch.no_grad():
        encoder.fc_prior.weight.mul_(300)
    return encoder


def _noise(n, seed=0):
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def small_encoder():
    return _varied(xcodec2_encoder.random_encoder(seed=0, semantic_config=small_semantic_config()))


def test_encode_matches_upstream_encode_code(decoder):
    """encode is XCodec2Model.encode_code's computation, run here on our submodules with the real
    CodecDecoderVocos (the decoder fixture's) as `generator`, holding our quantizer's weights. The
    semantic model is w2v-BERT 2.0's full default configuration (transformers' Wav2Vec2BertConfig,
    580M parameters): building it and encoding twice costs ~10 s on 2 idle CPUs (measured), under the
    ~30 s that would call for a reduced config."""
    from types import SimpleNamespace

    from transformers import Wav2Vec2BertConfig
    from xcodec2.modeling_xcodec2 import XCodec2Model  # importing it downloads nothing

    enc = _varied(xcodec2_encoder.random_encoder(seed=0))
    config = enc.semantic_model.config
    assert type(config) is Wav2Vec2BertConfig and config.output_hidden_states
    defaults = Wav2Vec2BertConfig()
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "feature_projection_input_dim", "add_adapter", "position_embeddings_type", "conv_depthwise_kernel_size"):
        assert getattr(config, key) == getattr(defaults, key), key
    assert (config.hidden_size, config.num_hidden_layers) == (1024, 24)
    assert enc.fc_prior.in_features == 2048  # upstream's Linear(2048, 2048) at full size
    enc.generator.quantizer.load_state_dict(decoder.generator.quantizer.state_dict())
    upstream = SimpleNamespace(**{k: getattr(enc, k) for k in ("semantic_model", "SemanticEncoder_module", "CodecEnc",
                                                               "fc_prior", "feature_extractor", "device")},
                               generator=decoder.generator)
    for n in (4037, 3200):  # 3200 is a multiple of 320: upstream's padding still adds a whole code
        wav = _noise(n)
        expected = XCodec2Model.encode_code(upstream, torch.from_numpy(wav).view(1, -1)).reshape(-1).numpy()
        codes = enc.encode(wav)
        assert codes.dtype == np.int32 and codes.shape == (n // SAMPLES_PER_CODE + 1,)
        np.testing.assert_array_equal(codes, expected)
        assert len(np.unique(codes)) > 3


def test_encode_rejects_bad_input_and_short_semantic_models(small_encoder):
    with pytest.raises(ValueError, match="non-empty 1-D"):
        small_encoder.encode(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        small_encoder.encode(np.zeros((2, 320), np.float32))
    codes = small_encoder.encode(_noise(7))  # shorter than a code: padded to one
    assert codes.shape == (1,) and 0 <= codes[0] < 65_536
    config = small_semantic_config()
    config.num_hidden_layers = 12
    with pytest.raises(ValueError, match=r"needs >= 16 layers \(hidden_states\[16\]"):
        xcodec2_encoder.XCodec2Encoder(config)


def _old_weight_norm_names(sd):
    """X.parametrizations.weight.original0/1 -> X.weight_g/_v: how torch.nn.utils.weight_norm (the
    API before parametrizations) names weight-normed convolutions in a checkpoint."""
    out = {}
    for k, v in sd.items():
        for i, old in ((0, "weight_g"), (1, "weight_v")):
            k = k.replace(f"parametrizations.weight.original{i}", old)
        out[k] = v
    return out


@pytest.fixture(scope="module")
def encoder_checkpoint(small_encoder, tmp_path_factory):
    """The small encoder's weights laid out as in HKUSTAudio/xcodec2's file: with decoder tensors
    the encoder never reads, CodecEnc's convolutions under the old weight-norm names, and no
    masked_spec_embed (training-only)."""
    sd = {k: v.detach().clone().contiguous() for k, v in small_encoder.state_dict().items()
          if k != "semantic_model.masked_spec_embed"}
    sd = _old_weight_norm_names(sd)
    assert any(k.startswith("CodecEnc.") and k.endswith("weight_g") for k in sd)
    path = tmp_path_factory.mktemp("xcodec2-encoder") / "model.safetensors"
    _save_safetensors(path, {**sd, "fc_post_a.weight": torch.zeros(4, 4), "generator.backbone.embed.weight": torch.zeros(3)})
    return path


def test_encoder_load_round_trip(small_encoder, encoder_checkpoint):
    loaded = xcodec2_encoder.load(encoder_checkpoint.parent, "cpu", semantic_config=small_semantic_config())
    assert not loaded.training
    got = loaded.state_dict()
    for k, v in small_encoder.state_dict().items():
        if k != "semantic_model.masked_spec_embed":
            assert torch.equal(got[k], v), k
    wav = _noise(2000, seed=3)
    np.testing.assert_array_equal(loaded.encode(wav), small_encoder.encode(wav))


def test_encoder_load_refuses_checkpoints_without_its_weights(small_encoder, encoder_checkpoint, tmp_path, monkeypatch):
    # A decoder-only checkpoint (what xcodec2_decoder reads) is not enough to encode.
    _save_safetensors(tmp_path / "dec" / "model.safetensors", {"fc_post_a.weight": torch.zeros(4, 4)})
    with pytest.raises(CodecUnavailable, match=r"not an XCodec2 checkpoint: \d+ encoder weights missing, e.g. semantic_model\."):
        xcodec2_encoder.load(tmp_path / "dec", "cpu", semantic_config=small_semantic_config())
    # One weight short is refused by name (read from memory), and another configuration's shapes too.
    (tmp_path / "model.safetensors").write_bytes(b"")
    sd = {k: v for k, v in small_encoder.state_dict().items() if k != "CodecEnc.conv_final_block.1.bias"}
    monkeypatch.setattr(xcodec2_decoder, "_read_weights", lambda path, prefixes: dict(sd))
    with pytest.raises(CodecUnavailable, match=r"1 encoder weights missing, e.g. CodecEnc\.conv_final_block\.1\.bias$"):
        xcodec2_encoder.load(tmp_path, "cpu", semantic_config=small_semantic_config())
    monkeypatch.undo()
    wider = small_semantic_config()
    wider.hidden_size = 48
    with pytest.raises(CodecUnavailable, match="does not match XCodec2's encoder.*size mismatch"):
        xcodec2_encoder.load(encoder_checkpoint.parent, "cpu", semantic_config=wider)
    (tmp_path / "none").mkdir()
    with pytest.raises(CodecUnavailable, match="no model.safetensors or pytorch_model.bin"):
        xcodec2_encoder.load(tmp_path / "none", "cpu")


def test_encoder_missing_package_is_codec_unavailable(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "xcodec2.vq.codec_encoder", None)  # import raises ImportError
    with pytest.raises(CodecUnavailable, match=r"does not import \(xcodec2\.vq\.codec_encoder: .*requirements-codec\.txt"):
        xcodec2_encoder.load(tmp_path, "cpu", semantic_config=small_semantic_config())


# --- reading reference recordings -----------------------------------------------------------------


def _write_wav(path, frames: np.ndarray, rate: int, width: int):
    """frames (N, channels) of raw integer samples, written with stdlib wave."""
    frames = np.asarray(frames)
    frames = frames[:, None] if frames.ndim == 1 else frames
    if width == 3:
        data = frames.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()  # low 3 bytes, little-endian
    else:
        data = frames.astype({1: np.uint8, 2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data)
    return path


def _sine(rate, seconds, hz=200.0, amplitude=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * hz * t)


@pytest.mark.parametrize("rate", [8_000, 44_100])
def test_read_wav_resamples_to_16k(tmp_path, rate):
    n = int(rate * 0.3)
    path = _write_wav(tmp_path / "x.wav", np.round(_sine(rate, 0.3) * 32767), rate, 2)
    x = read_wav(path)
    assert x.dtype == np.float32 and x.shape == (int(np.ceil(n * 16_000 / rate)),)
    expected = _sine(16_000, len(x) / 16_000)[: len(x)]
    middle = slice(400, len(x) - 400)  # the resampling filter's edges aside
    np.testing.assert_allclose(x[middle], expected[middle], atol=0.01)


def test_read_wav_mixes_channels_and_reads_each_sample_width(tmp_path):
    left, right = np.round(_sine(16_000, 0.1) * 32767), np.round(_sine(16_000, 0.1, hz=50) * 32767)
    x = read_wav(_write_wav(tmp_path / "stereo.wav", np.stack([left, right], 1), 16_000, 2))
    np.testing.assert_allclose(x, (left + right) / 2 / 32768, atol=1e-6)
    for width, raw, expected in ((1, [0, 128, 255], [-1, 0, 127 / 128]),
                                 (3, [-2**23, -1, 0, 1, 2**23 - 1], [-1, -2**-23, 0, 2**-23, 1 - 2**-23]),
                                 (4, [-2**31, 0, 2**31 - 1], [-1, 0, 1])):
        x = read_wav(_write_wav(tmp_path / f"w{width}.wav", np.array(raw), 16_000, width))
        np.testing.assert_allclose(x, expected, atol=1e-7, err_msg=f"{width * 8}-bit")
    # 24-bit stereo at 22.05 kHz: every step at once.
    x = read_wav(_write_wav(tmp_path / "s24.wav", np.stack([left, -left], 1) * 256, 22_050, 3))
    assert x.shape == (int(np.ceil(len(left) * 16_000 / 22_050)),) and np.abs(x).max() < 1e-3


def test_read_wav_refuses_unreadable_float_and_empty_files(tmp_path):
    import struct

    (tmp_path / "junk.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(SynthesisError, match="cannot read .*junk.wav as a wav file of integer PCM"):
        read_wav(tmp_path / "junk.wav")
    with pytest.raises(SynthesisError, match="cannot read .*absent.wav"):
        read_wav(tmp_path / "absent.wav")
    data = np.zeros(16, "<f4").tobytes()  # IEEE float (format 3): not integer PCM
    fmt = struct.pack("<HHIIHH", 3, 1, 16_000, 64_000, 4, 32)
    (tmp_path / "float.wav").write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<I", 16)
                                         + fmt + b"data" + struct.pack("<I", len(data)) + data)
    with pytest.raises(SynthesisError, match="integer PCM .*unknown format: 3"):
        read_wav(tmp_path / "float.wav")
    with pytest.raises(SynthesisError, match="no audio in it"):
        read_wav(_write_wav(tmp_path / "empty.wav", np.zeros((0, 1)), 16_000, 2))
