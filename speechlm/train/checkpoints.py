"""Checkpoint policy on top of Bridge's own checkpointing: when to save, what to keep, and a
record of how each checkpoint was made.

The rules live here (no Megatron import); `speechlm.train.checkpoint_manager` plugs them into Bridge
through `checkpoint.custom_manager_class`, so saving and loading stay Bridge's (torch_dist,
async on GPU). What Bridge has no setting for:
- a schedule of save intervals (every 5,000 iterations up to 30,000, then every 10,000);
- retention: the last `keep_last` checkpoints plus pinned ones; the rest are deleted
  (Bridge's `most_recent_k` cannot pin);
- `provenance.json` in every checkpoint: git commit, package versions, resolved config,
  token-layout, manifest and blend hashes.
Provenance and retention follow a save once it is durable (`after_durable_save`): at once for a
synchronous save, at its finalize step for an asynchronous one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from speechlm.model.conversion import TRACKER_FILE  # Megatron's tracker: the checkpoint a resume loads

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
    return set(configured) | {i for i in saved_iterations(save_dir) if (iteration_dir(save_dir, i) / PIN_FILE).exists()}


def pin(ckpt: str | Path, note: str) -> bool:
    """Pin one checkpoint directory with `note` as the pin file's text, unless it is pinned already.
    True if this call pinned it; False if a pin was there (a user's `touch`, or another note)."""
    try:
        with open(Path(ckpt) / PIN_FILE, "x") as f:
            f.write(note + "\n")
        return True
    except FileExistsError:
        return False


def pin_note(ckpt: str | Path) -> str | None:
    """The text of a checkpoint's pin file ("" for a bare `touch`), or None when it is not pinned."""
    try:
        return (Path(ckpt) / PIN_FILE).read_text().strip()
    except FileNotFoundError:
        return None


def unpin(ckpt: str | Path, note: str) -> bool:
    """Remove the pin only if its text is `note`: a pin someone else set stays. True if removed."""
    if pin_note(ckpt) != note:
        return False
    (Path(ckpt) / PIN_FILE).unlink(missing_ok=True)
    return True


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def tracked_iteration(save_dir: str | Path) -> int | None:
    """The iteration the tracker names (what a resume loads), or None."""
    tracker = Path(save_dir) / TRACKER_FILE
    try:
        return int(tracker.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def after_durable_save(save_dir: str | Path, step: int, policy: dict | None = None) -> list[int]:
    """Once the save of `step` is durable (rank 0 only): its provenance.json, then retention over the
    checkpoints up to `step` (later ones may still be in flight), never deleting `step` or the one the
    tracker names. Returns the deleted iterations."""
    policy = POLICY if policy is None else policy
    save_dir = Path(save_dir)
    ckpt = iteration_dir(save_dir, step)
    if ckpt.is_dir():
        (ckpt / "provenance.json").write_text(json.dumps({"iteration": step, **policy["provenance"]}, indent=2))
    if not policy["keep_last"]:
        return []
    kept = pinned_iterations(save_dir, policy["pinned"]) | {step, tracked_iteration(save_dir)}
    old = checkpoints_to_delete([i for i in saved_iterations(save_dir) if i <= step], policy["keep_last"], kept)
    for i in old:
        shutil.rmtree(iteration_dir(save_dir, i), ignore_errors=True)
    return old
