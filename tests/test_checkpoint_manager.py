"""Checkpoint retention: the rule and the save-interval schedule (issue 7), and retention and
provenance following a save once it is durable (issue 15, defect 7): right after a synchronous
save, at Bridge's finalize step for an asynchronous one.

CPU has no asynchronous save, so the manager test drives Bridge's real finalize path
(`DefaultCheckpointManager.finalize_async_saves` -> the async queue) with a stand-in for the
queue and for the writing part of Bridge's save; it runs in a subprocess
(`python tests/test_checkpoint_manager.py drive OUT`) so that this pytest process never imports Bridge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # when run as a script

from speechlm.train import checkpoints  # noqa: E402
from speechlm.model.conversion import TRACKER_FILE  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def test_retention_rule_and_schedule():
    assert checkpoints.checkpoints_to_delete([5, 10, 15, 20, 25], keep_last=2, pinned={10}) == [5, 15]
    assert checkpoints.checkpoints_to_delete([5], keep_last=5, pinned=set()) == []
    schedule = [[30000, 5000], [None, 10000]]
    assert [checkpoints.save_interval_at(i, schedule) for i in (0, 25000, 29999, 30000, 90000)] == \
        [5000, 5000, 5000, 10000, 10000]


def _iter(save: Path, step: int) -> Path:
    return save / f"iter_{step:07d}"


def _make(save: Path, *steps: int, tracker: int | None = None) -> None:
    for step in steps:
        _iter(save, step).mkdir(parents=True)
    if tracker is not None:
        (save / TRACKER_FILE).write_text(str(tracker))


def test_retention_after_a_durable_save_spares_later_and_tracked_checkpoints(tmp_path):
    policy = {"schedule": [], "keep_last": 1, "pinned": [5], "provenance": {"git_commit": "abc"}}
    # 30 is still being written (later than the save being finalized); the tracker names 10.
    _make(tmp_path, 5, 10, 15, 20, 30, tracker=10)
    (_iter(tmp_path, 15) / checkpoints.PIN_FILE).touch()
    assert checkpoints.after_durable_save(tmp_path, 20, policy) == []
    assert checkpoints.saved_iterations(tmp_path) == [5, 10, 15, 20, 30]
    assert json.loads((_iter(tmp_path, 20) / "provenance.json").read_text()) == {"iteration": 20, "git_commit": "abc"}
    assert not (_iter(tmp_path, 30) / "provenance.json").exists()

    (tmp_path / TRACKER_FILE).write_text("20")  # once the tracker moves on, 10 goes
    assert checkpoints.after_durable_save(tmp_path, 20, policy) == [10]
    assert checkpoints.saved_iterations(tmp_path) == [5, 15, 20, 30]
    assert checkpoints.after_durable_save(tmp_path, 20, {**policy, "keep_last": None}) == []  # no retention set


# --- the manager, with a save still in flight ------------------------------------------------------


class FakeAsyncQueue:
    """What Bridge's `state.async_calls_queue` offers; a request finalizes once the test marks it written."""

    def __init__(self):
        self.calls: list[dict] = []

    def schedule(self, finalize) -> None:
        self.calls.append({"written": False, "finalize": finalize})

    def maybe_finalize_async_calls(self, blocking: bool = False) -> None:
        while self.calls and (blocking or self.calls[0]["written"]):
            self.calls.pop(0)["finalize"]()

    def get_num_unfinalized_calls(self) -> int:
        return len(self.calls)

    def close(self) -> None:
        self.maybe_finalize_async_calls(blocking=True)


def _drive(out: str) -> None:
    """Saves through SpeechLMCheckpointManager, async and sync; a snapshot of the directory after each event."""
    from speechlm.train import megatron_env  # noqa: F401  (CPU mode before any megatron.bridge import)
    from megatron.bridge.training.checkpointing import DefaultCheckpointManager
    from megatron.bridge.training.config import CheckpointConfig

    from speechlm.train.checkpoint_manager import SpeechLMCheckpointManager

    def bridge_save(self, ctx, callback_manager):
        # Bridge's save: the iteration directory now; the tracker when the save is durable.
        save, step = Path(self.checkpoint_config.save), ctx.state.train_state.step
        (_iter(save, step) / "weights").mkdir(parents=True)
        durable = lambda: (save / TRACKER_FILE).write_text(str(step))  # noqa: E731
        if self.checkpoint_config.async_save:
            ctx.state.async_calls_queue.schedule(durable)
        else:
            durable()

    DefaultCheckpointManager.save = bridge_save
    checkpoints.POLICY.update(schedule=[], keep_last=1, pinned=[], provenance={"git_commit": "abc"})
    report = {}

    def snapshot(save: Path, label: str) -> None:
        report[label] = {
            "dirs": checkpoints.saved_iterations(save),
            "provenance": [i for i in checkpoints.saved_iterations(save) if (_iter(save, i) / "provenance.json").is_file()],
            "tracker": int((save / TRACKER_FILE).read_text()) if (save / TRACKER_FILE).is_file() else None,
        }

    for mode in ("async", "sync"):
        save = Path(out) / mode
        manager = SpeechLMCheckpointManager(CheckpointConfig(save=str(save), async_save=mode == "async"))
        queue = FakeAsyncQueue() if mode == "async" else None
        state = SimpleNamespace(async_calls_queue=queue, train_state=SimpleNamespace(step=0),
                                cfg=SimpleNamespace(checkpoint=manager.checkpoint_config))

        def save_at(step: int) -> None:
            state.train_state.step = step
            manager.save(SimpleNamespace(state=state, non_persistent_ckpt=False), None)

        save_at(10)
        snapshot(save, f"{mode} 10 scheduled")
        if queue:
            manager.finalize_async_saves(state)  # Bridge's per-step call: nothing written yet
            snapshot(save, f"{mode} 10 not written")
            queue.calls[0]["written"] = True
            manager.finalize_async_saves(state)
            snapshot(save, f"{mode} 10 finalized")
        save_at(20)
        save_at(30)  # while 20 is still in flight
        snapshot(save, f"{mode} 20 and 30 scheduled")
        if queue:
            queue.calls[0]["written"] = True
            manager.finalize_async_saves(state)
            snapshot(save, f"{mode} 20 finalized")
            manager.finalize_async_saves(state, blocking=True, terminate=True)  # the end of training
            snapshot(save, f"{mode} end")
    Path(out, "report.json").write_text(json.dumps(report, indent=1))


@pytest.mark.slow
def test_async_save_retention_and_provenance_wait_for_finalize(tmp_path):
    proc = subprocess.run([sys.executable, __file__, "drive", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads((tmp_path / "report.json").read_text())
    state = lambda dirs, provenance, tracker: {"dirs": dirs, "provenance": provenance, "tracker": tracker}  # noqa: E731
    # Scheduled, not durable: no provenance, nothing deleted, the tracker unchanged.
    assert r["async 10 scheduled"] == r["async 10 not written"] == state([10], [], None), r
    assert r["async 10 finalized"] == state([10], [10], 10), r
    # keep_last=1, yet 10 (the tracker's) outlives its replacements until one is durable.
    assert r["async 20 and 30 scheduled"] == state([10, 20, 30], [10], 10), r
    # 20 durable: 10 goes; 30, still in flight, neither counts nor gets provenance.
    assert r["async 20 finalized"] == state([20, 30], [20], 20), r
    assert r["async end"] == state([30], [30], 30), r
    # A synchronous save is durable when save() returns: provenance and retention at once.
    assert r["sync 10 scheduled"] == state([10], [10], 10), r
    assert r["sync 20 and 30 scheduled"] == state([30], [30], 30), r


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "drive":
    _drive(sys.argv[2])
