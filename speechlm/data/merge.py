"""The merge both builders share: every input's partials into the final prefixes, then
manifest.json. A builder gives only what differs (`Spec`): how to hash its settings, its words in
messages, and its manifest (built on `manifest`).

Output, next to build.json and partials/ (`speechlm.data.partials`):
  <stem>_<lang>_train.bin/.idx, <stem>_<lang>_valid.bin/.idx   merged datasets
  manifest.json               what was written, what was skipped and why, layout hash, settings
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from speechlm import atomic
from speechlm.data.mix import MANIFEST_FILE  # the planner reads what this writes; it stays Megatron-free
from speechlm.data.partials import BUILD_FILE, DTYPE, PARTIALS, SPLITS, prefix_name, read_done, shard_id

MANIFEST_VERSION = 1


@dataclass
class Merged:
    """The done records of a build, added up."""

    build: dict[str, Any]  # build.json
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> counts of all inputs
    skips: dict[str, int] = field(default_factory=dict)
    bad: list[dict[str, Any]] = field(default_factory=list)  # inputs recorded with an error
    samples_read: int = 0
    written: set[str] = field(default_factory=set)  # prefixes with at least one document


@dataclass(frozen=True)
class Spec:
    """What one builder's merge differs in."""

    tool: str  # the builder's CLI, named when build.json is missing
    error: type[Exception]  # raised for a directory that cannot be merged
    unit: str  # one input in the progress line and the bad-input records: "shard", "file"
    inputs: str  # inputs in the not-done error: "shards", "input files"
    fingerprint: Callable[[dict[str, Any]], str]  # build.json's settings -> the done records' hash
    manifest: Callable[[Merged], dict[str, Any]]
    check: Callable[[Path, dict[str, Any]], None] | None = None  # refuses another builder's build.json


def add_counts(dst: dict[str, Any], src: dict[str, Any]) -> None:
    """Add the numbers of `src` into `dst`, nested dicts included."""
    for k, v in src.items():
        if isinstance(v, dict):
            add_counts(dst.setdefault(k, {}), v)
        else:
            dst[k] = dst.get(k, 0) + v


def merge(output: str | Path, spec: Spec, progress: bool = True) -> dict[str, Any]:
    """Combine every input's partials into the final prefixes and write manifest.json.

    Partials are appended with IndexedDatasetBuilder.add_index in sorted input order; each final
    file is written under a temporary name and renamed. Refuses while any input is not done.
    """
    output = Path(output)
    if not (output / BUILD_FILE).is_file():
        raise spec.error(f"{output} has no {BUILD_FILE}: run {spec.tool} first")
    build = json.loads((output / BUILD_FILE).read_text())
    if spec.check is not None:
        spec.check(output, build)
    fingerprint = spec.fingerprint(build["settings"])
    urls = sorted(build["shards"])
    records, missing = [], []
    for url in urls:
        rec = read_done(output, url, fingerprint)
        (missing.append(url) if rec is None else records.append(rec))
    if missing:
        raise spec.error(
            f"{len(missing)} of {len(urls)} {spec.inputs} are not done (first: {missing[0]}); "
            "run the remaining tasks (or rerun the failed ones) before merging"
        )
    # add_index calls gc.collect() once per partial; with megatron-core imported that walks
    # ~500k objects (~0.25 s). Freezing them (they live for the whole run) makes it ~free.
    gc.freeze()
    m = Merged(build)
    by_prefix: dict[str, list[Path]] = {}
    for rec in records:
        m.samples_read += rec["samples_read"]
        add_counts(m.skips, rec["skips"])
        for name, d in rec["datasets"].items():
            add_counts(m.datasets.setdefault(name, {}), d)
        for p in rec["prefixes"]:
            by_prefix.setdefault(p, []).append(output / PARTIALS / shard_id(rec["shard"]) / p)
        if rec["error"]:
            m.bad.append({spec.unit: rec["shard"], "error": rec["error"], "samples_read": rec["samples_read"]})
    t0 = time.monotonic()
    for name in sorted(by_prefix):
        _merge_prefix(output, name, by_prefix[name])
    if progress:
        print(f"merged {len(records)} {spec.unit}s into {len(by_prefix)} prefixes in {time.monotonic() - t0:.1f} s",
              file=sys.stderr)
    m.written = set(by_prefix)
    manifest_ = spec.manifest(m)
    atomic.write_json(output / MANIFEST_FILE, manifest_, indent=2, sort_keys=True)
    return manifest_


def _merge_prefix(output: Path, name: str, parts: list[Path]) -> None:
    # Not atomic.atomic_path: a killed merge leaves `.<name>.tmp.bin/.idx`, which the next merge
    # overwrites under the same names (a per-process name would be left behind for good).
    tmp_bin, tmp_idx = output / f".{name}.tmp.bin", output / f".{name}.tmp.idx"
    b = IndexedDatasetBuilder(str(tmp_bin), dtype=DTYPE)
    for part in parts:
        b.add_index(str(part))
    b.finalize(str(tmp_idx))
    os.replace(tmp_bin, output / f"{name}.bin")
    os.replace(tmp_idx, output / f"{name}.idx")


def manifest(m: Merged, *, kind: str, stem: str, counts: tuple[str, ...], inputs_key: str,
             identity: dict[str, str] | None = None) -> dict[str, Any]:
    """The manifest shape both builders write: one entry per dataset `<stem>_<language>` with
    `counts` per split, totals, skips, the build's settings. `identity` (e.g. the text source) is
    added to the top and to every entry; `inputs_key` holds the input total and the bad inputs."""
    identity = identity or {}
    out: dict[str, Any] = {}
    for name in sorted(m.datasets):
        d = m.datasets[name]
        language = name[len(stem) + 1:]
        entry: dict[str, Any] = {"kind": kind, **identity, "language": language}
        for split in SPLITS:
            sp = d.get(split, {})
            pname = prefix_name(stem, language, split)
            entry[split] = {
                "prefix": pname if pname in m.written else None,  # relative to the manifest
                **{k: sp.get(k, 0) for k in counts},
            }
        entry["split_samples"] = d.get("split_samples", 0)
        entry["skips"] = dict(sorted(d.get("skips", {}).items()))
        out[name] = entry
    build = m.build
    return {
        "version": MANIFEST_VERSION,
        "kind": kind,
        **identity,
        "layout_hash": build["layout_hash"],
        "settings": build["settings"],
        "inputs": build["inputs"],
        inputs_key: {"total": len(build["shards"]), "bad": m.bad},
        "samples_read": m.samples_read,
        "totals": {k: sum(e[s][k] for e in out.values() for s in SPLITS) for k in counts},
        "skips": dict(sorted(m.skips.items())),
        "datasets": out,
    }
