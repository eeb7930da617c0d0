"""What both builders (`speech`, `text`) share up to the merge: the output directory's build.json,
one partial directory per input (a shard or a file) with its done record, the task split, and the
loop a task runs over its inputs.

Layout of an output directory:
  build.json                  settings and the sorted input list, written by the first task
  partials/<input-id>/        one finished input: <prefix>.bin/.idx + done.json (the marker)

Determinism: a partial depends only on the input's bytes and the settings, and the merge
(`speechlm.data.merge`) concatenates partials in sorted input order. So the merged bytes do not
depend on the number of tasks, on which task did which input, or on a task being killed and rerun.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from speechlm import atomic

log = logging.getLogger(__name__)

SPLITS = ("train", "valid")
BUILD_FILE = "build.json"
PARTIALS = "partials"
DONE_FILE = "done.json"
DTYPE = np.int32  # ids reach 193,791: more than uint16 holds


class SpeechDataError(RuntimeError):
    """A build cannot start or finish (bad model dir, settings conflict, inputs not done). The base
    of both builders' errors (`text.TextDataError` is one); named for the builder that came first."""


class BuildSettings:
    """Base of a builder's frozen settings dataclass: what decides the output bytes, and its hash
    (every task of a build and the merge must agree on it)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @property
    def fingerprint(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_valid_key(key: str, fraction: float) -> bool:
    """Held-out validation sample? A hash of the key: stable across reruns and task counts, and
    every piece of a split segment lands on the same side."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h < fraction * 2.0**64


def prefix_name(stem: str, language: str, split: str) -> str:
    """A prefix's name: stem is the speech kind or the text source."""
    return f"{stem}_{language}_{split}"


# --- writing one input's partials --------------------------------------------------------------
class PartialWriter:
    """Writes the documents of one input into per-prefix builders in a temporary directory, and
    counts them per dataset (`<stem>_<language>`). Subclasses add `write` and name their counts."""

    COUNTS: tuple[str, ...] = ("samples", "documents", "tokens")  # per split of a dataset
    EXTRA: dict[str, Any] = {}  # more per-dataset counters and their start values

    def __init__(self, tmp: Path, stem: str):
        self.tmp, self.stem = tmp, stem
        self.builders: dict[str, IndexedDatasetBuilder] = {}
        self.datasets: dict[str, dict[str, Any]] = {}
        self.skips: Counter[str] = Counter()
        self.samples_read = 0

    def ds(self, language: str) -> dict[str, Any]:
        name = f"{self.stem}_{language}"
        d = self.datasets.get(name)
        if d is None:
            d = self.datasets[name] = {"skips": {}, "split_samples": 0, **self.EXTRA,
                                       **{s: dict.fromkeys(self.COUNTS, 0) for s in SPLITS}}
        return d

    def skip(self, reason: str, language: str | None) -> None:
        self.skips[reason] += 1
        if language is not None:
            s = self.ds(language)["skips"]
            s[reason] = s.get(reason, 0) + 1

    def builder(self, language: str, split: str) -> IndexedDatasetBuilder:
        name = prefix_name(self.stem, language, split)
        b = self.builders.get(name)
        if b is None:
            b = self.builders[name] = IndexedDatasetBuilder(str(self.tmp / f"{name}.bin"), dtype=DTYPE)
        return b

    def finalize(self) -> list[str]:
        for name, b in self.builders.items():
            b.finalize(str(self.tmp / f"{name}.idx"))
        return sorted(self.builders)

    def record(self, url: str, fingerprint: str, error: str | None) -> dict[str, Any]:
        """Finalize the prefixes; the input's done record (what `read_done` and the merge read)."""
        prefixes = self.finalize()
        return {
            "shard": url,
            "settings": fingerprint,
            "error": error,
            "samples_read": self.samples_read,
            "skips": dict(sorted(self.skips.items())),
            "prefixes": prefixes,
            "datasets": {k: self.datasets[k] for k in sorted(self.datasets)},
        }


class Processor(Protocol):
    def process(self, url: str, tmp: Path) -> dict[str, Any]:
        """Write the partials of one input into `tmp`; return its done record."""
        ...


# --- files -------------------------------------------------------------------------------------
def shard_id(url: str) -> str:
    """A directory name for an input: readable tail + hash of the full URL (names may repeat)."""
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", url.rsplit("/", 1)[-1])[-60:]
    return f"{tail}-{hashlib.sha1(url.encode()).hexdigest()[:12]}"


def read_done(output: Path, url: str, fingerprint: str | None = None) -> dict[str, Any] | None:
    """The done record of an input, or None if it is not (validly) finished."""
    path = output / PARTIALS / shard_id(url) / DONE_FILE
    try:
        rec = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if rec.get("shard") != url or (fingerprint is not None and rec.get("settings") != fingerprint):
        return None
    return rec


def check_build_file(output: Path, record: dict[str, Any]) -> None:
    """Write build.json, or check that an existing one (another task, an earlier run) agrees."""
    path = output / BUILD_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        keys = ("settings", "shards", "layout_hash")
        differ = [k for k in keys if old.get(k) != record.get(k)]
        if differ:
            detail = ""
            if "shards" in differ:
                a, b = set(old.get("shards", [])), set(record["shards"])
                detail = f" ({len(b - a)} shards new, {len(a - b)} gone)"
            raise SpeechDataError(
                f"{output} was started with other {', '.join(differ)}{detail}: use a fresh output "
                "directory (or delete it) to build with these"
            )
        return
    atomic.write_json(path, record, indent=2, sort_keys=True)


def task_shards(shards: list[str], num_tasks: int, task_index: int) -> list[str]:
    """This task's inputs: round-robin over the sorted list (inputs of similar size spread evenly)."""
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise SpeechDataError(f"task index {task_index} is not in 0..{num_tasks - 1}")
    return sorted(shards)[task_index::num_tasks]


def process_atomic(proc: Processor, output: Path, url: str) -> dict[str, Any]:
    """Process into a temporary directory, write the marker, then rename into place: a partial
    directory exists only when complete, whatever moment the process dies at.

    Not `atomic.atomic_path`: a killed run's `.tmp-<id>-<pid>` (another pid, so atomic_path would
    never see it) is removed here before the input is redone."""
    parts = output / PARTIALS
    sid = shard_id(url)
    for stale in parts.glob(f".tmp-{sid}-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parts / f".tmp-{sid}-{os.getpid()}"
    tmp.mkdir()
    try:
        rec = proc.process(url, tmp)
        (tmp / DONE_FILE).write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
        final = parts / sid
        if final.exists():  # finished under other settings: replace
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rec


# --- a task ------------------------------------------------------------------------------------
class Progress:
    """One stderr line every few seconds: inputs done, samples/s and tokens/s."""

    def __init__(self, total: int, label: str, enabled: bool, every: float = 2.0):
        self.total, self.label, self.enabled, self.every = total, label, enabled, every
        self.t0 = self.last = time.monotonic()
        self.done = self.skipped = self.samples = self.tokens = 0

    def update(self, samples: int = 0, tokens: int = 0, skipped: bool = False, force: bool = False) -> None:
        self.done += 1
        self.skipped += skipped
        self.samples += samples
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and (force or now - self.last >= self.every or self.done == self.total):
            self.last = now
            dt = max(now - self.t0, 1e-9)
            print(
                f"{self.label}shards {self.done}/{self.total} ({self.skipped} already done) | "
                f"{self.samples / dt:,.0f} samples/s | {self.tokens / dt:,.0f} tokens/s",
                file=sys.stderr,
                flush=True,
            )


def run_partials(
    proc: Processor,
    output: Path,
    build_record: dict[str, Any],
    fingerprint: str,
    *,
    num_tasks: int,
    task_index: int,
    progress: bool,
    unit: str,
) -> tuple[list[str], list[tuple[str, str]]]:
    """Write (or check) build.json, then process this task's inputs (`build_record["shards"]`)
    into partials, skipping finished ones. Returns (this task's inputs, failed: (input, why) of
    those that hit a non-data error, e.g. S3 down past the retries; a rerun tries them again).
    `unit` names an input in the log ("shard", "input")."""
    (output / PARTIALS).mkdir(parents=True, exist_ok=True)
    check_build_file(output, build_record)
    mine = task_shards(build_record["shards"], num_tasks, task_index)
    prog = Progress(len(mine), f"[task {task_index}/{num_tasks}] " if num_tasks > 1 else "", progress)
    failed: list[tuple[str, str]] = []
    for url in mine:
        if read_done(output, url, fingerprint) is not None:
            prog.update(skipped=True)
            continue
        try:
            rec = process_atomic(proc, output, url)
        except Exception as e:  # not a data problem: keep going, report, leave it not done
            log.error("%s %s failed: %s", unit, url, e)
            failed.append((url, f"{type(e).__name__}: {e}"))
            prog.update()
            continue
        prog.update(rec["samples_read"], sum(d[s]["tokens"] for d in rec["datasets"].values() for s in SPLITS))
    return mine, failed
