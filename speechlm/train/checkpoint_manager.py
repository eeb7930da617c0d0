"""Bridge checkpoint manager applying the rules of `speechlm.train.checkpoints` once each save is durable."""

from __future__ import annotations

import torch.distributed as dist
from megatron.bridge.training.checkpointing import DefaultCheckpointManager

from speechlm.train.checkpoints import POLICY, after_durable_save, save_interval_at


def _unfinalized(state) -> int:
    """Asynchronous saves scheduled and not yet finalized (the same count on every rank)."""
    queue = state.async_calls_queue
    return queue.get_num_unfinalized_calls() if queue is not None else 0


class SpeechLMCheckpointManager(DefaultCheckpointManager):
    """Provenance and retention once a save is durable: right after a synchronous save; for an
    asynchronous one when Bridge finalizes it, as Bridge defers its own `most_recent_k` clean-up (a
    scheduled save may still fail, and the checkpoint the tracker names must outlive it)."""

    def __init__(self, checkpoint_config) -> None:
        super().__init__(checkpoint_config)
        self._in_flight: list[int] = []  # steps of scheduled async saves, oldest first

    def save(self, ctx, callback_manager) -> None:
        queued = _unfinalized(ctx.state)
        super().save(ctx, callback_manager)
        step = ctx.state.train_state.step
        if _unfinalized(ctx.state) > queued:
            self._in_flight.append(step)
        else:
            self._after_durable_save(step)
        self._apply_schedule(ctx.state, step)

    def finalize_async_saves(self, state, blocking: bool = False, terminate: bool = False) -> None:
        super().finalize_async_saves(state, blocking=blocking, terminate=terminate)
        # The queue finalizes in the order it was filled: the oldest of ours are the durable ones.
        durable = max(0, len(self._in_flight) - _unfinalized(state))
        done, self._in_flight = self._in_flight[:durable], self._in_flight[durable:]
        for step in done:
            self._after_durable_save(step)

    def load(self, ctx):
        result = super().load(ctx)
        self._apply_schedule(ctx.state, ctx.state.train_state.step)
        return result

    def _after_durable_save(self, step: int) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            after_durable_save(self.checkpoint_config.save, step)

    def _apply_schedule(self, state, step: int) -> None:
        interval = save_interval_at(step, POLICY["schedule"]) if POLICY["schedule"] else None
        if interval:
            state.cfg.checkpoint.save_interval = interval
