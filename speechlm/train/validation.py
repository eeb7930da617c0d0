"""Validation loss and perplexity for each (kind, language) validation set on its own.

Bridge evaluates one validation iterator (the blend of all held-out sets) at every
`validation.eval_interval`. Its evaluation loop cannot take several sets, so this callback runs
Bridge's own `evaluate()` once more per named set right after it, on the same held-out samples
each time, and logs `<name> lm loss` / `<name> ppl` to tensorboard (and wandb when configured).
"""

from __future__ import annotations

import copy
import math

from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.eval import evaluate
from megatron.bridge.utils.common_utils import print_rank_last
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.rerun_state_machine import RerunDataIterator
from megatron.core.utils import get_model_config


class PerSetValidation(Callback):
    def __init__(self, sets: dict[str, str], forward_step_func):
        self.sets = dict(sorted(sets.items()))
        self.forward_step_func = forward_step_func
        self._loaders: dict[str, object] | None = None
        self._evaluated_at: int | None = None

    def _dataset(self, cfg, name: str, prefix: str, n_samples: int):
        """The held-out samples of one set: a copy of the training dataset config reading only this
        prefix for the valid split (per-split blends bypass `split`; no __post_init__ re-run)."""
        ds_cfg = copy.copy(cfg.dataset)
        ds_cfg.blend, ds_cfg.blend_per_split = None, [None, ([prefix], None), None]
        return BlendedMegatronDatasetBuilder(GPTDataset, [0, n_samples, 0], lambda: True, ds_cfg).build()[1]

    def _build_loaders(self, state) -> dict[str, object]:
        from megatron.bridge.data.samplers import build_pretraining_data_loader

        cfg = state.cfg
        n_samples = cfg.validation.eval_iters * cfg.validation.eval_global_batch_size
        # Every rank gets its own loader, as Bridge builds its own: get_batch reads the iterator on
        # every rank (TP ranks included), nothing is broadcast.
        return {
            name: build_pretraining_data_loader(
                self._dataset(cfg, name, prefix, n_samples), 0, "single", cfg.validation.eval_micro_batch_size, 0,
                cfg.dataset.data_sharding, pin_memory=False, data_parallel_rank=parallel_state.get_data_parallel_rank(),
                data_parallel_size=parallel_state.get_data_parallel_world_size(),
            )
            for name, prefix in self.sets.items()
        }

    def on_eval_end(self, context) -> None:
        state = context.state
        if self._loaders is None:
            self._loaders = self._build_loaders(state)
        step = state.train_state.step
        # evaluate() counts what it reads as Bridge's own validation samples; a resumed run starts
        # Bridge's validation loader at that count (SFT's is not cyclic and would run dry), so the
        # per-set passes leave the counter as Bridge's evaluation left it.
        consumed = state.train_state.consumed_valid_samples
        try:
            for name, loader in self._loaders.items():
                losses, _, timelimit = evaluate(state, self.forward_step_func, RerunDataIterator(iter(loader)),
                                                context.model, None, get_model_config(context.model[0]), verbose=False)
                if timelimit or not losses:
                    continue
                loss = losses["lm loss"].item()
                ppl = math.exp(min(20.0, loss))
                print_rank_last(f" validation {name} at iteration {step} | lm loss: {loss:.6E} | ppl: {ppl:.6E}")
                for writer in (state.tensorboard_logger,):
                    if writer is not None:
                        writer.add_scalar(f"validation/{name} lm loss", loss, step)
                        writer.add_scalar(f"validation/{name} ppl", ppl, step)
                if state.wandb_logger is not None:
                    state.wandb_logger.log({f"validation/{name} lm loss": loss, f"validation/{name} ppl": ppl}, step)
        finally:
            state.train_state.consumed_valid_samples = consumed
        self._evaluated_at = step

    def on_train_end(self, context) -> None:
        # After train(), Bridge's pretrain() evaluates the validation set once more. When the last
        # iteration has just been evaluated (train_iters a multiple of eval_interval) that is the
        # same evaluation again, per-set passes included: skip it. Every checkpoint is written by now.
        state = context.state
        if self._evaluated_at == state.train_state.step and state.train_state.do_valid:
            state.train_state.do_valid = False
            print_rank_last(f" validation at iteration {self._evaluated_at} already done: not repeated after training")
