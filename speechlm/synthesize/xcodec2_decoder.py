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
Finding, reading and strictly loading a checkpoint's tensors is shared with the encode half
(xcodec2_encoder.py), which reads the same file under other prefixes.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 16_000
SAMPLES_PER_CODE = 320  # hop length: 50 codes a second
CODEBOOK_SIZE = 65_536  # FSQ levels [4] * 8: codes 0..65535
PREFIXES = ("generator.", "fc_post_a.")  # the checkpoint tensors decoding reads
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CodecUnavailable(RuntimeError):
    """No decoder (or encoder): the packages are missing, or the directory holds no usable XCodec2 weights."""


def codec_import(module: str, name: str):
    """`name` from an xcodec2-stack module, imported on first use (CodecUnavailable if it cannot be)."""
    # torchao (imported by torchtune, imported by xcodec2) warns that its C++ kernels do not
    # match this torch; the codec uses none of them.
    torchao_log = logging.getLogger("torchao")
    level = torchao_log.level
    torchao_log.setLevel(logging.ERROR)
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as e:  # ImportError, or a package that fails at import time (e.g. a torch mismatch)
        raise CodecUnavailable(f"the XCodec2 package does not import ({module}: {type(e).__name__}: {e}); "
                               "install requirements-codec.txt with `bash scripts/setup.sh`") from e
    finally:
        torchao_log.setLevel(level)


def _decoder_class():
    """xcodec2's CodecDecoderVocos (scripts/setup.sh calls this to check the install)."""
    return codec_import("xcodec2.vq.codec_decoder_vocos", "CodecDecoderVocos")


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


def weights_path(codec_dir: Path) -> Path:
    """The checkpoint file of a local XCodec2 directory (safetensors first)."""
    if not codec_dir.is_dir():
        raise CodecUnavailable(f"{codec_dir}: not a directory")
    for name in WEIGHT_FILES:
        if (codec_dir / name).is_file():
            return codec_dir / name
    raise CodecUnavailable(f"{codec_dir}: no {' or '.join(WEIGHT_FILES)} (expected a local copy of HKUSTAudio/xcodec2)")


def _read_weights(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file whose names start with one of `prefixes`."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:  # reads only the tensors asked for
                return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        sd = sd.get("state_dict", sd)
        return {k: v for k, v in sd.items() if k.startswith(prefixes)}
    except Exception as e:  # a truncated or foreign file
        raise CodecUnavailable(f"{path}: unreadable ({type(e).__name__}: {e})") from e


def load_weights(model: nn.Module, path: Path, prefixes: tuple[str, ...], what: str,
                 optional: tuple[str, ...] = ()) -> None:
    """Load `path`'s `prefixes` tensors into `model`, strictly: every parameter (but `optional`
    ones) must be there with its shape, and no other key under `prefixes`; CodecUnavailable else."""
    sd = _read_weights(path, prefixes)
    own = model.state_dict()
    # xcodec2 weight-norms its convolutions (CodecEnc) with torch parametrizations; a checkpoint saved
    # with the older torch.nn.utils.weight_norm names them X.weight_g / X.weight_v. load_state_dict
    # renames those itself (torch's compatibility hook); renamed here first, the check below sees them.
    suffix = "parametrizations.weight.original0"
    for k in own:
        base = k[: -len(suffix)]
        if k.endswith(suffix) and base + "weight_g" in sd and base + "weight_v" in sd:
            sd[k] = sd.pop(base + "weight_g")
            sd[base + "parametrizations.weight.original1"] = sd.pop(base + "weight_v")
    params = dict(model.named_parameters())
    missing = [k for k in own if k not in sd]
    shown = [k for k in missing if k in params and k not in optional]
    if shown:
        raise CodecUnavailable(f"{path}: not an XCodec2 checkpoint: {len(shown)} {what} weights missing, e.g. "
                               + ", ".join(shown[:5]))
    for k in missing:  # persistent buffers (e.g. the ISTFT window) follow from the configuration
        sd[k] = own[k]
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # unexpected keys under `prefixes`, or shapes of another configuration
        raise CodecUnavailable(f"{path}: does not match XCodec2's {what}: {' '.join(str(e).split())}") from None


def load(codec_dir: str | Path, device: str = "cpu") -> XCodec2Decoder:
    """The decoder with a local XCodec2 checkpoint's weights (strict: every decoder parameter)."""
    path = weights_path(Path(codec_dir))
    model = XCodec2Decoder()  # CodecUnavailable when the packages are missing
    load_weights(model, path, PREFIXES, "decoder")
    return model.eval().to(device)
