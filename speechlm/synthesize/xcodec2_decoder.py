"""XCodec2 decoding (codes -> 16 kHz audio) for speechlm.synthesize, with the real `xcodec2` package.

    dec = load("/models/xcodec2", "cpu")        # a local copy of HKUSTAudio/xcodec2
    samples = dec.decode(codes)                 # int32 (T,) in 0..65535 -> float32 (320*T,)

We do not construct `xcodec2.modeling_xcodec2.XCodec2Model`: its __init__ downloads
facebook/w2v-bert-2.0 (the semantic encoder and its feature extractor), which only *encoding*
uses. Decoding touches two submodules: `generator` (CodecDecoderVocos: the FSQ quantizer, a
Vocos transformer backbone and an ISTFT head) and `fc_post_a` (Linear 2048 -> 1024).
XCodec2Decoder builds exactly those, under the same names, so the checkpoint's
`generator.*` / `fc_post_a.*` tensors load strictly; everything else in it (semantic_model.*,
CodecEnc.*, ...) is never read. `forward` is XCodec2Model.decode_code's computation.

The xcodec2 import is deferred: without the packages of requirements-codec.txt (installed by
scripts/setup.sh) `load` raises CodecUnavailable with the reason, and synthesize writes codes only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 16_000
SAMPLES_PER_CODE = 320  # hop length: 50 codes a second
CODEBOOK_SIZE = 65_536  # FSQ levels [4] * 8: codes 0..65535
PREFIXES = ("generator.", "fc_post_a.")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CodecUnavailable(RuntimeError):
    """No decoder: the packages are missing, or the directory holds no usable XCodec2 weights."""


def _decoder_class():
    """xcodec2's CodecDecoderVocos, imported on first use (CodecUnavailable if it cannot be)."""
    # torchao (imported by torchtune, imported by xcodec2) warns that its C++ kernels do not
    # match this torch; the decoder uses none of them.
    torchao_log = logging.getLogger("torchao")
    level = torchao_log.level
    torchao_log.setLevel(logging.ERROR)
    try:
        from xcodec2.vq.codec_decoder_vocos import CodecDecoderVocos
    except Exception as e:  # ImportError, or a package that fails at import time (e.g. a torch mismatch)
        raise CodecUnavailable(f"the XCodec2 decode path does not import ({type(e).__name__}: {e}); "
                               "install requirements-codec.txt with `bash scripts/setup.sh`") from e
    finally:
        torchao_log.setLevel(level)
    return CodecDecoderVocos


class XCodec2Decoder(nn.Module):
    """The decode half of XCodec2Model (its default configuration), with the same key names."""

    def __init__(self):
        super().__init__()
        self.generator = _decoder_class()()
        self.fc_post_a = nn.Linear(2048, 1024)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, 1, T) long -> audio (B, 1, 320*T); XCodec2Model.decode_code without the transposes that cancel."""
        emb = self.generator.quantizer.get_output_from_indices(codes.transpose(1, 2))  # (B, T, 2048)
        emb = self.fc_post_a(emb)  # (B, T, 1024)
        return self.generator(emb, vq=False)[0]

    @property
    def device(self) -> torch.device:
        return self.fc_post_a.weight.device

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int codes (T,) in 0..65535 -> float32 samples (320*T,) at 16 kHz."""
        codes = np.asarray(codes)
        if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes: need a 1-D integer array, got {codes.dtype} {codes.shape}")
        if len(codes) == 0:
            return np.zeros(0, np.float32)
        if codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
            raise ValueError(f"codes: outside 0..{CODEBOOK_SIZE - 1} (min {codes.min()}, max {codes.max()})")
        x = torch.from_numpy(codes.astype(np.int64)).view(1, 1, -1).to(self.device)
        with torch.inference_mode():
            y = self(x)
        return y.reshape(-1).float().cpu().numpy()


def random_decoder(seed: int = 0, device: str = "cpu") -> XCodec2Decoder:
    """The decoder with xcodec2's own initialisation from `seed` (no weights, no download): for tests."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return XCodec2Decoder().eval().to(device)


def _weights_path(codec_dir: Path) -> Path:
    if not codec_dir.is_dir():
        raise CodecUnavailable(f"{codec_dir}: not a directory")
    for name in WEIGHT_FILES:
        if (codec_dir / name).is_file():
            return codec_dir / name
    raise CodecUnavailable(f"{codec_dir}: no {' or '.join(WEIGHT_FILES)} (expected a local copy of HKUSTAudio/xcodec2)")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The generator.* / fc_post_a.* tensors of a checkpoint file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:  # reads only the decoder's tensors
                return {k: f.get_tensor(k) for k in f.keys() if k.startswith(PREFIXES)}
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        sd = sd.get("state_dict", sd)
        return {k: v for k, v in sd.items() if k.startswith(PREFIXES)}
    except Exception as e:  # a truncated or foreign file
        raise CodecUnavailable(f"{path}: unreadable ({type(e).__name__}: {e})") from e


def load(codec_dir: str | Path, device: str = "cpu") -> XCodec2Decoder:
    """The decoder with a local XCodec2 checkpoint's weights (strict: every decoder parameter)."""
    path = _weights_path(Path(codec_dir))
    model = XCodec2Decoder()  # CodecUnavailable when the packages are missing
    sd = _read_weights(path)
    own = model.state_dict()
    params = dict(model.named_parameters())
    missing = [k for k in own if k not in sd]
    if any(k in params for k in missing):
        shown = [k for k in missing if k in params]
        raise CodecUnavailable(f"{path}: not an XCodec2 checkpoint: {len(shown)} decoder weights missing, e.g. "
                               + ", ".join(shown[:5]))
    for k in missing:  # persistent buffers (the ISTFT window) follow from the configuration
        sd[k] = own[k]
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # unexpected generator.* keys, or shapes of another configuration
        raise CodecUnavailable(f"{path}: does not match XCodec2's decoder: {' '.join(str(e).split())}") from None
    return model.eval().to(device)
