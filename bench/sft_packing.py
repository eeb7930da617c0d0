"""SFT packing at the brief's scale (issue 19): today's per-rank pure-Python packing vs the
cached, compiled one (speechlm.data.sft_packing), side by side in one run.

    .venv/bin/python bench/sft_packing.py                      # 60 M pairs (~2 GB of disk under /tmp)
    .venv/bin/python bench/sft_packing.py --pairs 2000000 --baseline-pairs 500000

Real TTS data of that size cannot exist here, so pair lengths are drawn from a realistic
distribution (20-60 text tokens + 50 codec tokens/s for 2-15 s utterances, log-normal around 6 s,
+ 5 specials) and written as real megatron-core .idx files (12 prefixes, as 12 languages) with
sparse .bin files of the right size: PackedTTSDataset reads them as it reads real data.
num_samples is one SFT epoch (tokens // (seq_length + 1)). Each measurement runs in its own
process: wall and CPU seconds of the construction, the growth of proportional set size (Pss,
/proc/self/smaps_rollup) after touching every page of the index, and the peak growth of
resident memory (VmHWM). The baseline (the old code, kept as the reference in
tests/test_sft_packing.py) runs on the first --baseline-pairs pairs and is extrapolated linearly
(per pair: its loop and lists are O(pairs)); the new code runs on that subsample too (ratio at the
same size, and the rows are checked identical) and at full size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _tests():
    spec = importlib.util.spec_from_file_location("test_sft_packing", REPO / "tests" / "test_sft_packing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pair_lengths(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(6.0), 0.5, n), 2.0, 15.0)
    return (rng.integers(20, 61, n) + np.round(50 * seconds).astype(np.int64) + 5).astype(np.int32)


def _status(key: str) -> int:
    """kB of a /proc/self/status line (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _pss() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise KeyError("Pss")


def worker(kind: str, spec: dict) -> dict:
    """One measurement in this process (imports done before the clock starts)."""
    import gc

    import torch.distributed as dist

    from speechlm.data import sft_packing  # noqa: F401 (imports megatron-core before the clock)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    reference = _tests().ReferencePacking if kind == "baseline" else None
    gc.collect()  # (the new build's time includes numba's import and compile: ~1-3 s)
    rss0, pss0, cpu0, t0 = _status("VmRSS"), _pss(), time.process_time(), time.perf_counter()
    if kind == "baseline":
        ds = reference(spec["prefixes"], spec["seq_length"], spec["num_samples"], spec["seed"])
        rows = (ds._row_start, ds._row_docs)
    else:
        from speechlm.data.sft_packing import PackedTTSDataset
        from speechlm.token_layout import TokenLayout

        ds = PackedTTSDataset(spec["prefixes"], spec["seq_length"], spec["num_samples"], spec["seed"], TokenLayout(),
                              False, path_to_cache=spec["cache"])
        rows = (ds._row_start, ds._row_docs)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    gc.collect()
    touched = sum(int(np.asarray(a).sum(dtype=np.int64)) for a in rows)  # every page, as an epoch of reads does
    if world > 1:
        dist.barrier()  # every rank maps the index now
    out = {"seconds": seconds, "cpu_seconds": cpu, "pss_mb": (_pss() - pss0) / 1024, "peak_mb": (_status("VmHWM") - rss0) / 1024,
           "rows": len(rows[0]) - 1, "epochs": ds.epochs, "fill": ds.fill, "touched": touched % 97}
    if kind == "new":
        out["built"], out["cache"] = ds.cache_built, str(ds.cache)
    elif spec.get("save"):
        np.save(spec["save"], np.asarray(rows[1]))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


def run_worker(kind: str, spec: dict, ranks: int = 1) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]), WORLD_SIZE=str(ranks))
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", kind, json.dumps(spec)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(ranks)]
    results = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"{kind} worker failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=60_000_000, help="TTS pairs (default 60 M, the brief's scale)")
    parser.add_argument("--baseline-pairs", type=int, default=2_000_000,
                        help="pairs the old pure-Python packing runs on (extrapolated linearly to --pairs)")
    parser.add_argument("--prefixes", type=int, default=12, help="indexed datasets the pairs are split over")
    parser.add_argument("--ranks", type=int, default=8, help="processes reading the cache at once (a node's ranks)")
    parser.add_argument("--seq-length", type=int, default=2048, help="recipes/sft_llama32_1b.yaml's")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--workdir", help="where the .idx/.bin files and caches go (default: a new /tmp dir, removed after)")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], json.loads(args.worker[1]))))
        return

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sft_packing_bench_"))
    tests = _tests()
    try:
        t0 = time.perf_counter()
        lengths = pair_lengths(args.pairs, args.seed)
        full = [str(tests.write_index(work / "data" / f"tts_{i:02d}", part))
                for i, part in enumerate(np.array_split(lengths, args.prefixes))]
        sub_n = min(args.baseline_pairs, args.pairs)
        sub = [str(tests.write_index(work / "subsample" / "tts", lengths[:sub_n]))]
        tokens, sub_tokens = int(lengths.sum(dtype=np.int64)), int(lengths[:sub_n].sum(dtype=np.int64))
        del lengths
        print(f"{args.pairs:,} pairs ({tokens / 1e9:.1f} B tokens, mean {tokens / args.pairs:.0f}) in {args.prefixes} "
              f"prefixes written in {time.perf_counter() - t0:.0f} s; uptime: {os.popen('uptime').read().strip()}", flush=True)
        capacity = args.seq_length + 1
        spec = {"seq_length": args.seq_length, "seed": args.seed}
        sub_spec = {**spec, "prefixes": sub, "num_samples": max(1, sub_tokens // capacity)}
        full_spec = {**spec, "prefixes": full, "num_samples": max(1, tokens // capacity), "cache": str(work / "cache")}

        base = run_worker("baseline", {**sub_spec, "save": str(work / "baseline_row_docs.npy")})[0]
        new_sub = run_worker("new", {**sub_spec, "cache": str(work / "cache_sub")})[0]
        identical = np.array_equal(np.load(work / "baseline_row_docs.npy"), np.load(Path(new_sub["cache"]) / "row_docs.npy"))
        first = run_worker("new", full_spec)[0]
        cached = run_worker("new", full_spec)[0]
        node = run_worker("new", full_spec, ranks=args.ranks)
        assert first["built"] and not cached["built"] and not any(r["built"] for r in node)
        scale = args.pairs / sub_n

        def row(name, old, new):
            print(f"{name:<44} {old:>26} {new:>26}")

        print(f"\nrows: {first['rows']:,} over {first['epochs']} epoch(s), {100 * first['fill']:.1f} % filled; "
              f"rows identical to the old packing on the {sub_n:,}-pair subsample: {identical}")
        row("", "old (pure Python, per rank)", "new (numba, cached, mmap)")
        row(f"build, {sub_n:,} pairs: wall / CPU s", f"{base['seconds']:.1f} / {base['cpu_seconds']:.1f}",
            f"{new_sub['seconds']:.2f} / {new_sub['cpu_seconds']:.2f}")
        row(f"first build, {args.pairs:,} pairs: wall / CPU s",
            f"~{base['seconds'] * scale:.0f} / {base['cpu_seconds'] * scale:.0f} (x{scale:.0f})",
            f"{first['seconds']:.1f} / {first['cpu_seconds']:.1f}")
        row("  speed-up (CPU s, same run)", "1", f"{base['cpu_seconds'] * scale / first['cpu_seconds']:.0f}x")
        row("  peak RSS growth of the builder, MB", f"~{base['peak_mb'] * scale:,.0f} (x{scale:.0f})", f"{first['peak_mb']:,.0f}")
        row("later starts: wall / CPU s, 1 rank", "(packs again)", f"{cached['seconds']:.1f} / {cached['cpu_seconds']:.1f}")
        row(f"later starts: slowest of {args.ranks} ranks at once, s", "(packs again, every rank)",
            f"{max(r['seconds'] for r in node):.1f}")
        row("index Pss per rank, MB: 1 rank", f"~{base['pss_mb'] * scale:,.0f} (x{scale:.0f})", f"{cached['pss_mb']:,.0f}")
        row(f"index Pss per rank, MB: {args.ranks} ranks (max)", f"~{base['pss_mb'] * scale:,.0f} (not shared)",
            f"{max(r['pss_mb'] for r in node):,.0f}")
        size = sum(f.stat().st_size for f in Path(first["cache"]).iterdir())
        print(f"\ncache entry: {size / 2**20:,.0f} MB ({first['cache']})")
        print(json.dumps({"pairs": args.pairs, "baseline_pairs": sub_n, "baseline": base, "new_subsample": new_sub,
                          "first": first, "cached": cached, "node": node, "identical": identical}))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
