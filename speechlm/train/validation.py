"""Validation loss, its standard error and perplexity for each (kind, language) validation set.

Bridge evaluates one validation iterator (the blend of all held-out sets) at every
`validation.eval_interval`. Right after it, this callback runs Bridge's own `evaluate()` ONCE over
a fixed per-set blend: the first `n` held-out samples of every set (the same samples at every
evaluation), interleaved, each sample tagged with its set's index as `dataset_id` (the key
megatron-core's BlendedDataset gives each sample). Our forward step (speechlm.train.forward_step)
adds each sample's summed loss, loss tokens and mean loss to a per-set accumulator; this callback
sums it over data-parallel ranks and logs, per set,

    validation <set> at iteration N | lm loss: X | stderr: Y | ppl: Z

and `validation/<set> lm loss`, `validation/<set> stderr`, `validation/<set> ppl` to tensorboard
(and wandb when configured). `lm loss` is token-weighted as Bridge's; `stderr` is the standard error
of the mean of the per-sample mean losses (sd / sqrt(n)), the same quantity when every sample has
the same number of loss tokens (pretraining).

Size: the per-set pass reads as many samples as Bridge's own evaluation (`eval_iters x
eval_global_batch_size`), split equally over the sets (at least 2 each): validation costs two
evaluations per interval however many sets there are (docs/performance.md, "Per-set validation").

SFT trains with Bridge's plain GPT step but validates its sets through ours (speechlm.train.run),
so it gets the same single pass. A forward step that does not attribute samples gets the previous
scheme: one `evaluate()` per set over `eval_iters x eval_global_batch_size` samples of that set
(`each_set=True`; also the baseline of bench/validation_overhead.py and tests/test_validation.py).
"""

from __future__ import annotations

import copy
import math

import torch
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.eval import evaluate
from megatron.bridge.utils.common_utils import print_rank_last
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.rerun_state_machine import RerunDataIterator
from megatron.core.utils import get_model_config

from speechlm.train.forward_step import PER_SET, per_set_results

MIN_PER_SET = 2  # a standard error needs two samples


class TaggedBlend(torch.utils.data.Dataset):
    """The first `n` samples of each dataset, interleaved (sample i is dataset i % k's sample
    i // k), each with `dataset_id` = its dataset's index."""

    def __init__(self, datasets: list, n: int):
        self.datasets, self.n = list(datasets), n
        self.collate_fn = getattr(self.datasets[0], "collate_fn", None) if self.datasets else None

    def __len__(self) -> int:
        return self.n * len(self.datasets)

    def __getitem__(self, idx: int):
        k = len(self.datasets)
        sample = self.datasets[idx % k][idx // k]
        return {"dataset_id": idx % k, **sample}


def samples_per_set(cfg, n_sets: int) -> int:
    """Bridge's evaluation size (eval_iters x eval_global_batch_size) split over the sets, at
    least MIN_PER_SET each."""
    return max(MIN_PER_SET, cfg.validation.eval_iters * cfg.validation.eval_global_batch_size // max(1, n_sets))


class PerSetValidation(Callback):
    def __init__(self, sets: dict[str, str], forward_step_func, each_set: bool | None = None,
                 per_set_samples: int | None = None, tag: str = ""):
        self.sets = dict(sorted(sets.items()))
        self.forward_step_func = forward_step_func
        # One attributed pass when the forward step can attribute samples, else one pass per set.
        self.each_set = not getattr(forward_step_func, "attributes_dataset_id", False) if each_set is None else each_set
        self.per_set_samples = per_set_samples  # None: samples_per_set()
        self.tag = tag  # appended to the names logged (the benchmark runs two schemes side by side)
        self._loaders: dict[str, object] | None = None
        self._blend_loader = None
        self._evaluated_at: int | None = None
        self.last: dict[str, dict] = {}  # {set: {loss, stderr, samples, tokens}} of the last evaluation

    def _dataset(self, cfg, name: str, prefix: str, n_samples: int):
        """The held-out samples of one set: a copy of the training dataset config reading only this
        prefix for the valid split (per-split blends bypass `split`; no __post_init__ re-run)."""
        ds_cfg = copy.copy(cfg.dataset)
        ds_cfg.blend, ds_cfg.blend_per_split = None, [None, ([prefix], None), None]
        return BlendedMegatronDatasetBuilder(GPTDataset, [0, n_samples, 0], lambda: True, ds_cfg).build()[1]

    def _loader(self, cfg, dataset):
        from megatron.bridge.data.samplers import build_pretraining_data_loader

        # Every rank gets its own loader, as Bridge builds its own: get_batch reads the iterator on
        # every rank (TP ranks included), nothing is broadcast.
        return build_pretraining_data_loader(
            dataset, 0, "single", cfg.validation.eval_micro_batch_size, 0, cfg.dataset.data_sharding,
            collate_fn=getattr(dataset, "collate_fn", None), pin_memory=False,
            data_parallel_rank=parallel_state.get_data_parallel_rank(),
            data_parallel_size=parallel_state.get_data_parallel_world_size(),
        )

    def _build_loaders(self, state) -> dict[str, object]:
        cfg = state.cfg
        n_samples = cfg.validation.eval_iters * cfg.validation.eval_global_batch_size
        return {name: self._loader(cfg, self._dataset(cfg, name, prefix, n_samples)) for name, prefix in self.sets.items()}

    def blend_size(self, cfg) -> tuple[int, int]:
        """(samples per set, evaluation iterations) of the attributed pass: whole global batches,
        so a set may get up to one batch's share more than asked."""
        n = self.per_set_samples or samples_per_set(cfg, len(self.sets))
        gbs = cfg.validation.eval_global_batch_size
        iters = math.ceil(n * len(self.sets) / gbs)
        return math.ceil(iters * gbs / len(self.sets)), iters

    def _build_blend_loader(self, state):
        cfg = state.cfg
        n, _ = self.blend_size(cfg)
        datasets = [self._dataset(cfg, name, prefix, n) for name, prefix in self.sets.items()]
        return self._loader(cfg, TaggedBlend(datasets, n))

    def _log(self, state, name: str, step: int, loss: float, stderr: float | None) -> None:
        ppl = math.exp(min(20.0, loss))
        name = name + self.tag
        err = f" | stderr: {stderr:.6E}" if stderr is not None else ""
        print_rank_last(f" validation {name} at iteration {step} | lm loss: {loss:.6E}{err} | ppl: {ppl:.6E}")
        scalars = {f"validation/{name} lm loss": loss, f"validation/{name} ppl": ppl}
        if stderr is not None and math.isfinite(stderr):
            scalars[f"validation/{name} stderr"] = stderr
        if state.tensorboard_logger is not None:
            for k, v in scalars.items():
                state.tensorboard_logger.add_scalar(k, v, step)
        if state.wandb_logger is not None:
            state.wandb_logger.log(scalars, step)

    def _evaluate(self, state, model, loader, eval_iters: int | None = None):
        """Bridge's evaluate() over `loader` (for `eval_iters` iterations when given)."""
        saved = state.cfg.validation.eval_iters
        if eval_iters is not None:
            state.cfg.validation.eval_iters = eval_iters
        try:
            return evaluate(state, self.forward_step_func, RerunDataIterator(iter(loader)), model, None,
                            get_model_config(model[0]), verbose=False)
        finally:
            state.cfg.validation.eval_iters = saved

    def evaluate_each_set(self, state, model) -> dict[str, dict]:
        """The previous scheme: one evaluation per set (no standard error)."""
        if self._loaders is None:
            self._loaders = self._build_loaders(state)
        out = {}
        for name, loader in self._loaders.items():
            losses, _, timelimit = self._evaluate(state, model, loader)
            if timelimit or not losses:
                continue
            out[name] = {"loss": losses["lm loss"].item(), "stderr": None}
        return out

    def evaluate_attributed(self, state, model) -> dict[str, dict]:
        """One evaluation over the per-set blend, each sample's loss attributed to its set."""
        if self._blend_loader is None:
            self._blend_loader = self._build_blend_loader(state)
        _, iters = self.blend_size(state.cfg)
        PER_SET.start(len(self.sets))
        try:
            losses, _, timelimit = self._evaluate(state, model, self._blend_loader, iters)
        finally:
            stats = PER_SET.stop()
        # Bridge reduces its own losses on the last pipeline stage over data-parallel (and context-
        # parallel) ranks; the per-set sums are reduced the same way (zeros on other stages).
        torch.distributed.all_reduce(stats, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        if timelimit or not losses:
            return {}
        return {name: r for name, r in zip(self.sets, per_set_results(stats)) if r is not None}

    def on_eval_end(self, context) -> None:
        state = context.state
        step = state.train_state.step
        # evaluate() counts what it reads as Bridge's own validation samples; a resumed run starts
        # Bridge's validation loader at that count (SFT's is not cyclic and would run dry), so the
        # per-set passes leave the counter as Bridge's evaluation left it.
        consumed = state.train_state.consumed_valid_samples
        try:
            results = (self.evaluate_each_set if self.each_set else self.evaluate_attributed)(state, context.model)
        finally:
            state.train_state.consumed_valid_samples = consumed
        for name, r in results.items():
            self._log(state, name, step, r["loss"], r["stderr"])
        self.last = results
        self._evaluated_at = step

    def on_train_end(self, context) -> None:
        # After train(), Bridge's pretrain() evaluates the validation set once more. When the last
        # iteration has just been evaluated (train_iters a multiple of eval_interval) that is the
        # same evaluation again, per-set passes included: skip it. Every checkpoint is written by now.
        state = context.state
        if self._evaluated_at == state.train_state.step and state.train_state.do_valid:
            state.train_state.do_valid = False
            print_rank_last(f" validation at iteration {self._evaluated_at} already done: not repeated after training")
