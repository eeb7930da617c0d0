"""Bridge checkpoint manager applying the rules of `speechlm.checkpoints` after every save."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.bridge.training.checkpointing import DefaultCheckpointManager

from speechlm.checkpoints import POLICY, checkpoints_to_delete, pinned_iterations, save_interval_at, saved_iterations


class SpeechLMCheckpointManager(DefaultCheckpointManager):
    def save(self, ctx, callback_manager) -> None:
        super().save(ctx, callback_manager)

        step = ctx.state.train_state.step
        save_dir = Path(self.checkpoint_config.save)
        if not dist.is_initialized() or dist.get_rank() == 0:
            ckpt = save_dir / f"iter_{step:07d}"
            if ckpt.is_dir():
                (ckpt / "provenance.json").write_text(json.dumps({"iteration": step, **POLICY["provenance"]}, indent=2))
            keep = POLICY["keep_last"]
            if keep:
                for old in checkpoints_to_delete(saved_iterations(save_dir), keep, pinned_iterations(save_dir, POLICY["pinned"])):
                    if old != step:
                        shutil.rmtree(save_dir / f"iter_{old:07d}", ignore_errors=True)
        self._apply_schedule(ctx.state, step)

    def load(self, ctx):
        result = super().load(ctx)
        self._apply_schedule(ctx.state, ctx.state.train_state.step)
        return result

    def _apply_schedule(self, state, step: int) -> None:
        interval = save_interval_at(step, POLICY["schedule"]) if POLICY["schedule"] else None
        if interval:
            state.cfg.checkpoint.save_interval = interval
