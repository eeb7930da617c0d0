"""Checkpoint policy on top of Bridge's own checkpointing: when to save, what to keep, and a
record of how each checkpoint was made.

The rules live here (no Megatron import); `speechlm.checkpoint_manager` plugs them into Bridge
through `checkpoint.custom_manager_class`, so saving and loading stay Bridge's (torch_dist,
async on GPU). What Bridge has no setting for:
- a schedule of save intervals (every 5,000 iterations up to 30,000, then every 10,000);
- retention: the last `keep_last` checkpoints plus pinned ones; the rest are deleted
  (Bridge's `most_recent_k` cannot pin);
- `provenance.json` in every checkpoint: git commit, package versions, resolved config,
  token-layout, manifest and blend hashes.
"""

from __future__ import annotations

import re
from pathlib import Path

ITER_DIR = re.compile(r"^iter_(\d{7})$")
PIN_FILE = "PINNED"  # `touch SAVE_DIR/iter_0050000/PINNED` keeps that checkpoint forever

# Set by speechlm.train before pretrain(): Bridge builds the manager from its config alone.
POLICY: dict = {"schedule": [], "keep_last": None, "pinned": [], "provenance": {}}


def save_interval_at(iteration: int, schedule: list[list[int | None]]) -> int | None:
    """The save interval in force after `iteration`: schedule = [[until, interval], ..., [None, interval]]."""
    for until, interval in schedule:
        if until is None or iteration < until:
            return interval
    return None


def checkpoints_to_delete(iterations: list[int], keep_last: int, pinned: set[int]) -> list[int]:
    """Every checkpoint except the newest `keep_last` and the pinned ones."""
    newest = set(sorted(iterations)[-keep_last:]) if keep_last > 0 else set()
    return sorted(i for i in iterations if i not in newest and i not in pinned)


def saved_iterations(save_dir: str | Path) -> list[int]:
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    return sorted(int(m[1]) for p in save_dir.iterdir() if p.is_dir() and (m := ITER_DIR.match(p.name)))


def pinned_iterations(save_dir: str | Path, configured: list[int]) -> set[int]:
    return set(configured) | {i for i in saved_iterations(save_dir) if (Path(save_dir) / f"iter_{i:07d}" / PIN_FILE).exists()}
