"""What Megatron will apply for a built ConfigContainer, read from Megatron's own objects rather
than from the recipe's text (printed by `speechlm.train --dry-run`; tests compare it with the recipes).

- weight decay per parameter group: megatron-core's grouping (`_get_param_groups` with Bridge's
  standard overrides: no decay on biases and 1-D parameters) over the model built on the meta
  device (real shapes, no memory), then a real `OptimizerParamScheduler` stepped as Bridge steps it;
- learning rate at step 0, at the end of warm-up and at the end of the run, from that scheduler;
- the vocabulary Megatron builds: Bridge's tokenizer-vs-model rule and its padding for the TP size;
- the layer spec and fused-kernel flags of the model provider (nothing built from them).

The meta model is built with megatron-core's local layers at TP 1 whatever the run's path (TE
layers need a GPU to build): its parameters are the same matrices, norms and biases, with the TE
spec's layer norms being the same 1-D weights under other names.
"""

from __future__ import annotations

import contextlib
import copy
import io
from types import SimpleNamespace

from speechlm.train import megatron_env

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def effective_settings(cfg, plan) -> dict:
    """The settings Megatron applies for `cfg` (a ConfigContainer from speechlm.train.build_config)
    and its Plan, as plain data."""
    names, groups = _param_groups(cfg)
    scheduler, sched_cfg = _scheduler(cfg, groups)
    # The scheduler counts samples: Bridge steps it by the global batch each iteration.
    gbs, warmup = cfg.train.global_batch_size, sched_cfg.lr_warmup_steps
    rows = [{"weight_decay_at_start": g["weight_decay"]} for g in groups]
    lr = {"train_iters": plan.train_iters, "warmup_iters": int(warmup // gbs), "at_step_0": _lr(groups)}
    scheduler.step(warmup)
    lr["at_end_of_warmup"] = _lr(groups)
    scheduler.step(plan.train_iters * gbs - warmup)
    lr["at_end"] = _lr(groups)
    for row, g in zip(rows, groups):
        params = g["params"]
        row.update(weight_decay_at_end=g["weight_decay"], parameters=len(params),
                   ndims=sorted({p.dim() for p in params}), examples=[names[id(p)] for p in params[:3]])
    m, mp = cfg.model, cfg.mixed_precision
    spec = m.transformer_layer_spec
    return {
        "param_groups": [r for r in rows if r["parameters"]],
        "scheduler": {"start_weight_decay": sched_cfg.start_weight_decay, "end_weight_decay": sched_cfg.end_weight_decay,
                      "weight_decay_incr_style": sched_cfg.weight_decay_incr_style,
                      "lr_decay_style": sched_cfg.lr_decay_style},
        "lr": lr,
        "vocabulary": _vocabulary(cfg),
        "model": {"parameters": sum(p.numel() for g in groups for p in g["params"]),
                  "layer_spec": getattr(spec, "__name__", type(spec).__name__),
                  "transformer_impl": m.transformer_impl,
                  "fusions": {name: bool(getattr(m, name)) for name in megatron_env._GPU_ONLY_FUSIONS},
                  "mixed_precision": mp if mp is None or isinstance(mp, str) else type(mp).__name__},
    }


def _lr(groups: list[dict]) -> float:
    return float(next(g for g in groups if g["default_config"])["lr"])


@contextlib.contextmanager
def _one_process():
    """A single-process gloo world (megatron-core's grouping gathers group keys over the world),
    unless one exists already."""
    from megatron.core import parallel_state

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _param_groups(cfg) -> tuple[dict[int, str], list[dict]]:
    from megatron.core.optimizer import _get_param_groups
    from megatron.bridge.training.config import OptimizerConfigOverrideProvider, OptimizerConfigOverrideProviderContext

    proxy = copy.deepcopy(cfg.model)
    proxy.tensor_model_parallel_size = proxy.pipeline_model_parallel_size = proxy.context_parallel_size = 1
    proxy.virtual_pipeline_model_parallel_size = None
    proxy.sequence_parallel = False
    megatron_env.adapt_provider(proxy, gpu=False)
    proxy.params_dtype, proxy.bf16, proxy.fp16 = torch.float32, False, False
    with _one_process(), contextlib.redirect_stdout(io.StringIO()):  # (its parameter count line)
        proxy.finalize()
        model = proxy.provide_distributed_model(wrap_with_ddp=False, init_model_with_meta_device=True,
                                                use_cpu_initialization=True)
        # The overrides Bridge's setup_optimizer builds (optim.py), then megatron-core's grouping.
        overrides = OptimizerConfigOverrideProvider().build_config_overrides(
            OptimizerConfigOverrideProviderContext(cfg.scheduler, cfg.optimizer, model))
        groups = _get_param_groups(model, cfg.optimizer, overrides)
    names = {id(p): n for chunk in model for n, p in chunk.named_parameters()}
    return names, groups


def _scheduler(cfg, groups: list[dict]):
    """Bridge's scheduler over those groups, its steps computed as Bridge's validate() does."""
    from megatron.bridge.training.optim import _get_scheduler

    probe = copy.copy(cfg)
    probe.scheduler = copy.deepcopy(cfg.scheduler)
    probe._calculate_scheduler_steps()
    with contextlib.redirect_stdout(io.StringIO()):
        scheduler = _get_scheduler(cfg.optimizer, probe.scheduler, SimpleNamespace(param_groups=groups))
    return scheduler, probe.scheduler


def _vocabulary(cfg) -> dict:
    """Rows of the embedding and output layer: Bridge's setup keeps a model vocabulary that covers the
    tokenizer's as it is (should_pad_vocab False) and pads only one derived from the tokenizer."""
    from megatron.bridge.training.setup import _validate_and_set_vocab_size
    from megatron.bridge.utils.vocab_utils import calculate_padded_vocab_size

    from speechlm.train.recipe import RecipeError

    m = cfg.model
    tokenizer_vocab = _tokenizer_vocab_size(cfg.tokenizer)
    try:
        vocab, pad = _validate_and_set_vocab_size(m.vocab_size, tokenizer_vocab, cfg.tokenizer.use_tokenizer_vocab_size)
    except ValueError as e:
        raise RecipeError(str(e)) from e
    tp = m.tensor_model_parallel_size
    padded = calculate_padded_vocab_size(vocab, m.make_vocab_size_divisible_by, tp) if pad else vocab
    return {"model": m.vocab_size, "tokenizer": tokenizer_vocab, "tensor_parallel": tp, "should_pad": pad,
            "divisible_by": m.make_vocab_size_divisible_by, "padded": padded}


_TOKENIZER_VOCAB: dict[str, int] = {}  # by TokenizerConfig: building a tokenizer takes seconds


def _tokenizer_vocab_size(tokenizer_cfg) -> int:
    """The vocabulary of the tokenizer Bridge's setup builds."""
    from megatron.bridge.training.tokenizers.tokenizer import build_tokenizer

    key = repr(tokenizer_cfg)
    if key not in _TOKENIZER_VOCAB:
        _TOKENIZER_VOCAB[key] = build_tokenizer(tokenizer_cfg).vocab_size
    return _TOKENIZER_VOCAB[key]
