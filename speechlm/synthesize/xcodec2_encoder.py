"""XCodec2 encoding (16 kHz audio -> codes) for voice cloning from a recording, with the real `xcodec2` package.

    enc = load("/models/xcodec2", "cpu")        # a local copy of HKUSTAudio/xcodec2
    codes = enc.encode(samples)                 # float (N,) at 16 kHz -> int32 (N // 320 + 1,) in 0..65535

We do not construct `xcodec2.modeling_xcodec2.XCodec2Model`: its __init__ downloads
facebook/w2v-bert-2.0 (the semantic model and its feature extractor). XCodec2Encoder builds the
submodules encoding touches, under the same names, so the checkpoint's `semantic_model.*`
(w2v-BERT 2.0, whose weights HKUSTAudio/xcodec2's checkpoint carries), `SemanticEncoder_module.*`,
`CodecEnc.*`, `fc_prior.*` and `generator.quantizer.*` tensors load strictly; the decoder's
tensors (the rest of `generator.*`, `fc_post_a.*`) are never read. The semantic model is
`transformers.Wav2Vec2BertModel` built from a `Wav2Vec2BertConfig` (w2v-BERT 2.0's by default) and
the feature extractor is `SeamlessM4TFeatureExtractor` with w2v-BERT 2.0's preprocessor settings:
nothing is fetched. `forward` is XCodec2Model.encode_code's computation.

The xcodec2 import is deferred, as in xcodec2_decoder.py: without the packages of
requirements-codec.txt `load` raises CodecUnavailable with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# CodecUnavailable is raised (by load) and caught (by synthesize) under this module's name too.
from speechlm.synthesize.xcodec2_decoder import (SAMPLE_RATE, SAMPLES_PER_CODE, CodecUnavailable,  # noqa: F401
                                                 codec_import, load_weights, weights_path)

PREFIXES = ("semantic_model.", "SemanticEncoder_module.", "CodecEnc.", "fc_prior.", "generator.quantizer.")
SEMANTIC_LAYER = 16  # encode_code reads semantic_output.hidden_states[16]
ACOUSTIC_SIZE = 1024  # CodecEncoder_Transformer's hidden_dim
VQ_DIM = 2048  # CodecDecoderVocos's vq_dim: fc_prior's output, the FSQ quantizer's input
# Only used for SpecAugment in training (Wav2Vec2BertModel._mask_hidden_states): a checkpoint
# without it encodes the same, so it may be absent.
OPTIONAL_KEYS = ("semantic_model.masked_spec_embed",)


def w2v_bert_2_0_config():
    """facebook/w2v-bert-2.0's configuration, without downloading it.

    transformers' Wav2Vec2BertConfig defaults are that architecture. What was checked (the model's
    own config.json was not readable in the stored copies we searched; these were):
    - ylacombe/w2v-bert-2.0's config.json (the repository facebook/w2v-bert-2.0's weights were
      uploaded from; architectures ["Wav2Vec2BertModel"]): hidden_size 1024, intermediate_size 4096,
      feature_projection_input_dim 160, hidden_act swish, layer_norm_eps 1e-5, add_adapter false,
      conv_depthwise_kernel_size 31, left_max_position_embeddings 64 -- all equal to the defaults;
      it also has apply_spec_augment false and layerdrop 0.1, which do nothing in eval mode.
    - fine-tunes whose config says "_name_or_path": "facebook/w2v-bert-2.0": num_hidden_layers 24,
      num_attention_heads 16, max_source_positions 5000 (= defaults).
    - transformers' own Xcodec2Config defaults its semantic model to Wav2Vec2BertConfig(num_hidden_layers=16),
      and its converter reads facebook/w2v-bert-2.0's config: the same architecture, cut at layer 16.
    Not verified: position_embeddings_type "relative_key" and right_max_position_embeddings 8 (defaults;
    seen only in third-party copies), and whether the checkpoint holds masked_spec_embed (see OPTIONAL_KEYS).
    output_hidden_states=True is what XCodec2Model passes to from_pretrained (encode_code reads hidden_states).
    """
    from transformers import Wav2Vec2BertConfig

    return Wav2Vec2BertConfig(output_hidden_states=True)


def w2v_bert_2_0_feature_extractor():
    """facebook/w2v-bert-2.0's feature extractor, without downloading its preprocessor_config.json.

    Its preprocessor_config.json (facebook/w2v-bert-2.0, "Upload feature extractor (#13)", 275 bytes)
    reads: SeamlessM4TFeatureExtractor, feature_size 80, num_mel_bins 80, padding_side "right",
    padding_value 1, return_attention_mask true, sampling_rate 16000, stride 2. All but padding_value
    are SeamlessM4TFeatureExtractor's defaults (its default padding_value is 0.0). encode_code's
    input always gives an even number of frames, so no frame is padded and padding_value is never
    used; it is set as the model has it anyway.
    """
    from transformers import SeamlessM4TFeatureExtractor

    return SeamlessM4TFeatureExtractor(feature_size=80, num_mel_bins=80, padding_side="right", padding_value=1.0,
                                       return_attention_mask=True, sampling_rate=SAMPLE_RATE, stride=2)


class _Quantizer(nn.Module):
    """CodecDecoderVocos's quantizer alone, named as there (`generator.quantizer.*`): encoding needs
    only its forward's vq=True branch, not the 187M-parameter decoder around it."""

    def __init__(self):
        super().__init__()
        residual_fsq = codec_import("vector_quantize_pytorch", "ResidualFSQ")
        self.quantizer = residual_fsq(dim=VQ_DIM, levels=[4] * 8, num_quantizers=1)  # as CodecDecoderVocos

    def forward(self, x: torch.Tensor, vq: bool = True):
        """CodecDecoderVocos.forward(x, vq=True): x (B, 2048, T) -> (quantized, codes (B, 1, T), None)."""
        if vq is not True:
            raise ValueError("the encoder holds only the quantizer; decoding is xcodec2_decoder's")
        x, q = self.quantizer(x.permute(0, 2, 1))
        return x.permute(0, 2, 1), q.permute(0, 2, 1), None


class XCodec2Encoder(nn.Module):
    """The encode half of XCodec2Model, with the same key names; `semantic_config` defaults to w2v-BERT 2.0's."""

    def __init__(self, semantic_config=None):
        super().__init__()
        from transformers import Wav2Vec2BertModel

        config = semantic_config if semantic_config is not None else w2v_bert_2_0_config()
        if config.num_hidden_layers < SEMANTIC_LAYER:
            raise ValueError(f"the semantic model needs >= {SEMANTIC_LAYER} layers (hidden_states[{SEMANTIC_LAYER}] "
                             f"is read), got {config.num_hidden_layers}")
        config.output_hidden_states = True
        semantic_encoder = codec_import("xcodec2.vq.module", "SemanticEncoder")
        codec_encoder = codec_import("xcodec2.vq.codec_encoder", "CodecEncoder_Transformer")
        hidden = config.hidden_size  # upstream's semantic_hidden_size (1024): only what depends on it follows it
        self.semantic_model = Wav2Vec2BertModel(config).eval()
        self.SemanticEncoder_module = semantic_encoder(hidden, hidden, hidden)
        self.CodecEnc = codec_encoder()
        self.generator = _Quantizer()
        self.fc_prior = nn.Linear(hidden + ACOUSTIC_SIZE, VQ_DIM)  # 2048 -> 2048 at w2v-BERT 2.0's size
        self.feature_extractor = w2v_bert_2_0_feature_extractor()  # not a module: no weights

    @property
    def device(self) -> torch.device:
        return self.fc_prior.weight.device

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (1, N) at 16 kHz -> codes (1, 1, N // 320 + 1): XCodec2Model.encode_code for one utterance."""
        # As upstream: 320 - N % 320 samples, so a length already a multiple of 320 gets a whole code more.
        wav = F.pad(wav, (0, SAMPLES_PER_CODE - wav.shape[1] % SAMPLES_PER_CODE))
        features = self.feature_extractor(F.pad(wav[0, :].cpu(), (160, 160)), sampling_rate=SAMPLE_RATE,
                                          return_tensors="pt").input_features.to(self.device)
        semantic = self.semantic_model(features).hidden_states[SEMANTIC_LAYER].transpose(1, 2)
        semantic = self.SemanticEncoder_module(semantic)  # (1, hidden, T)
        acoustic = self.CodecEnc(wav.to(self.device).unsqueeze(1)).transpose(1, 2)  # (1, 1024, T)
        emb = self.fc_prior(torch.cat([semantic, acoustic], dim=1).transpose(1, 2)).transpose(1, 2)
        return self.generator(emb, vq=True)[1]

    def encode(self, samples_16k: np.ndarray) -> np.ndarray:
        """float samples (N,) at 16 kHz, N >= 1 -> int32 codes (N // 320 + 1,) in 0..65535."""
        samples = np.asarray(samples_16k, dtype=np.float32)
        if samples.ndim != 1 or samples.size == 0:
            raise ValueError(f"samples: need a non-empty 1-D array, got {samples.shape}")
        with torch.inference_mode():
            codes = self(torch.from_numpy(samples).view(1, -1))
        return codes.reshape(-1).cpu().numpy().astype(np.int32)  # FSQ levels [4] * 8: 0..65535


def random_encoder(seed: int = 0, semantic_config=None, device: str = "cpu") -> XCodec2Encoder:
    """The encoder with its modules' own initialisation from `seed` (no weights, no download): for tests."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return XCodec2Encoder(semantic_config).eval().to(device)


def load(codec_dir: str | Path, device: str = "cpu", semantic_config=None) -> XCodec2Encoder:
    """The encoder with a local XCodec2 checkpoint's weights (strict: every encoder parameter).

    HKUSTAudio/xcodec2's checkpoint holds w2v-BERT 2.0's weights as semantic_model.*; a
    `semantic_config` other than w2v-BERT 2.0's is for checkpoints written by tests."""
    path = weights_path(Path(codec_dir))
    model = XCodec2Encoder(semantic_config)  # CodecUnavailable when the packages are missing
    load_weights(model, path, PREFIXES, "encoder", optional=OPTIONAL_KEYS)
    return model.eval().to(device)
