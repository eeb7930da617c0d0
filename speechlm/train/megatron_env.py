"""Entry into Megatron-Bridge: CPU mode when there is no GPU, and the model provider settings
that differ between the GPU path (TransformerEngine) and the CPU path (local layers).

Import this module before anything from `megatron.bridge`.
"""

from __future__ import annotations

import os

from speechlm.train import cpu_compat

CPU_MODE = cpu_compat.apply()
# A GPU without TransformerEngine (PyTorch + the megatron wheels only, docs/gpu.md): local layers.
NO_TE_GPU = cpu_compat.no_te_active()

# Fused kernels that exist only on GPU (TE / apex / CUDA JIT).
_GPU_ONLY_FUSIONS = (
    "bias_activation_fusion",
    "masked_softmax_fusion",
    "persist_layer_norm",
    "apply_rope_fusion",
    "bias_dropout_fusion",
    "gradient_accumulation_fusion",
    "cross_entropy_loss_fusion",
)


def gpu_mode(gpu: bool | None = None) -> bool:
    """Whether a configuration is built for the GPU path: `gpu` when given (e.g. to print or compare
    the GPU configuration on a CPU machine, without building a model), else this machine's mode."""
    return not CPU_MODE if gpu is None else gpu


def uses_te(gpu: bool | None = None) -> bool:
    """Whether the configuration takes TransformerEngine's layers: the GPU path (`gpu=True`, or
    this machine's GPU) unless this machine's GPU has no TransformerEngine."""
    return gpu if gpu is not None else not (CPU_MODE or NO_TE_GPU)


def adapt_provider(provider, gpu: bool | None = None) -> None:
    """Make a Bridge `GPTModelProvider` buildable here: TE layer spec on GPU (Bridge's default),
    megatron-core's local spec and no fused kernels on CPU and on a GPU without TE (the fusions
    need TE, Apex or compiling kernels at run time, none of which a bare GPU machine has)."""
    if uses_te(gpu):
        return
    from megatron.bridge.models.gpt_provider import local_layer_spec

    provider.transformer_layer_spec = local_layer_spec
    provider.transformer_impl = "local"
    for name in _GPU_ONLY_FUSIONS:
        setattr(provider, name, False)


def distributed_backend(gpu: bool | None = None) -> str:
    return "nccl" if gpu_mode(gpu) else "gloo"


def init_single_process_env() -> None:
    """torch.distributed env defaults so a tool also runs as a plain `python script.py`."""
    for key, value in dict(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
