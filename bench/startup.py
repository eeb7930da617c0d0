"""Start-up at 100 B tokens: building the training data's indices before the first step.

Before a pretraining run's first step, megatron-core's BlendedMegatronDatasetBuilder (through
Bridge) builds, for every dataset of the blend, a GPTDataset's document / sample / shuffle
indices and then the BlendedDataset's blending indices. Global rank 0 builds them and writes
them to a cache, the other ranks wait at a barrier and then read the cache. This script measures
that, with real megatron-core code on real `.idx` indexes, for a simulated blend:

  --datasets (40) datasets totalling --tokens (100 B) tokens: sequence lengths drawn from the
  blend's kinds (speech 2-40 s at 50 codes/s, TTS pairs with a transcript, text up to
  --seq-length), weights proportional to size; the `.bin` files are sparse (the right size,
  no data: index building never reads tokens).

Each case runs --ranks processes (gloo), twice: a first launch (empty cache) and a relaunch:
  baseline   `dataset.path_to_cache` unset (megatron-core's default: GPTDataset indices in a
             `cache/` folder inside each dataset prefix, blending indices not cached at all)
  recipe     `dataset.path_to_cache` as the recipes set it (one directory; every index cached)
and prints per case and launch: rank 0's build and every other rank's wait and load, wall.

    python bench/startup.py [--datasets 40] [--tokens 100e9] [--ranks 2] [--workdir DIR]

The simulated data (~3 GB of .idx at 100 B tokens) is written once into --workdir and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HEADER = b"MMIDIDX\x00\x00"  # megatron-core's IndexedDataset index format, version 1
INT32_CODE = 4  # DType code of numpy.int32 (our token ids exceed uint16)
VOCAB = 193_792


def kind_lengths(kind: str, n: int, seq_length: int, rng: np.random.Generator) -> np.ndarray:
    """Document lengths (tokens) of one kind, as data_prep writes them (each at most seq_length)."""
    if kind == "text":
        lengths = rng.lognormal(np.log(600), 0.8, n)  # long records are split at seq_length
    else:
        seconds = np.clip(rng.lognormal(np.log(8), 0.6, n), 2, 40)
        lengths = seconds * 50 + (rng.integers(20, 80, n) if kind == "tts" else 0) + 5
    return np.clip(lengths, 16, seq_length).astype(np.int32)


def write_indexed(prefix: Path, lengths: np.ndarray) -> None:
    """A real .idx (one sequence per document) and a sparse .bin of the matching size."""
    pointers = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * 4, out=pointers[1:])
    with open(f"{prefix}.idx.tmp", "wb") as f:
        f.write(HEADER + struct.pack("<Q", 1) + struct.pack("<B", INT32_CODE))
        f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(lengths) + 1))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(int(lengths.astype(np.int64).sum()) * 4)
    os.replace(f"{prefix}.idx.tmp", f"{prefix}.idx")


def simulate_blend(root: Path, datasets: int, tokens: float, seq_length: int, seed: int = 0) -> dict:
    """Write (or reuse) the simulated blend; returns {prefixes, weights, tokens, documents}."""
    meta_path = root / "blend.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["datasets"] == datasets and meta["tokens_goal"] == tokens and meta["seq_length"] == seq_length:
            return meta
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    kinds = [("audio", "tts", "text")[i % 3] for i in range(datasets)]
    shares = rng.lognormal(0, 1.0, datasets)  # a few large datasets and a long tail
    shares /= shares.sum()
    prefixes, sizes, docs = [], [], []
    t0 = time.perf_counter()
    for i, (kind, share) in enumerate(zip(kinds, shares)):
        goal = share * tokens
        mean = float(kind_lengths(kind, 100_000, seq_length, np.random.default_rng(i)).mean())
        lengths = kind_lengths(kind, max(1, int(goal / mean)), seq_length, rng)
        prefix = root / f"{kind}_{i:02d}"
        write_indexed(prefix, lengths)
        prefixes.append(str(prefix))
        sizes.append(int(lengths.astype(np.int64).sum()))
        docs.append(len(lengths))
        print(f"  simulated {prefix.name}: {len(lengths):,} documents, {sizes[-1] / 1e9:.2f} B tokens", flush=True)
    meta = {"datasets": datasets, "tokens_goal": tokens, "seq_length": seq_length, "prefixes": prefixes,
            "weights": [s / sum(sizes) for s in sizes], "tokens": sum(sizes), "documents": sum(docs),
            "seconds_to_write": time.perf_counter() - t0}
    meta_path.write_text(json.dumps(meta))
    return meta


def build(rank: int, world: int, port: int, meta: dict, cache: str | None, num_samples: int, seq_length: int,
          threads: int, out: str) -> None:
    """One rank: what Bridge's dataset provider does before the first step (the train split)."""
    import logging
    from types import SimpleNamespace

    import torch

    logging.disable(logging.WARNING)  # megatron-core logs every index it builds
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tokenizer = SimpleNamespace(vocab_size=VOCAB, eod=128_001, pad=128_004, unique_identifiers={"bench": 1})
    config = GPTDatasetConfig(random_seed=1234, sequence_length=seq_length, blend_per_split=[
        (meta["prefixes"], meta["weights"]), None, None], path_to_cache=cache, tokenizer=tokenizer,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        num_dataset_builder_threads=threads)
    torch.distributed.barrier()
    t0 = time.perf_counter()
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    seconds = time.perf_counter() - t0
    assert len(datasets[0]) >= num_samples
    torch.distributed.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"seconds": seconds}))
    torch.distributed.destroy_process_group()


def launch(meta: dict, cache: str | None, ranks: int, num_samples: int, seq_length: int, threads: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        port = 29_500 + os.getpid() % 1000
        t0 = time.perf_counter()
        mp.start_processes(build, args=(ranks, port, meta, cache, num_samples, seq_length, threads, out),
                           nprocs=ranks, start_method="spawn")
        wall = time.perf_counter() - t0
        per_rank = [json.loads(Path(out, f"rank{r}.json").read_text())["seconds"] for r in range(ranks)]
    return {"rank0": per_rank[0], "others": max(per_rank[1:], default=0.0), "wall": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", type=int, default=40)
    p.add_argument("--tokens", type=float, default=100e9, help="tokens in the blend and in the run (one epoch)")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--ranks", type=int, default=2, help="processes per launch (gloo); rank 0 builds")
    p.add_argument("--threads", type=int, default=1, help="dataset.num_dataset_builder_threads")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "speechlm-startup-bench"),
                   help="where the simulated blend is written (reused when it matches)")
    a = p.parse_args(argv)
    if a.ranks < 2 or a.datasets < 1 or a.tokens < a.seq_length:
        p.error("need --ranks >= 2, --datasets >= 1, --tokens >= --seq-length")
    root = Path(a.workdir)
    print(f"simulated blend: {a.datasets} datasets, {a.tokens / 1e9:.0f} B tokens, in {root / 'data'}", flush=True)
    meta = simulate_blend(root / "data", a.datasets, a.tokens, a.seq_length)
    num_samples = int(meta["tokens"] // a.seq_length)  # a run of one epoch of the blend
    idx_bytes = sum(os.path.getsize(f"{q}.idx") for q in meta["prefixes"])
    print(f"  {meta['documents']:,} documents, {meta['tokens'] / 1e9:.1f} B tokens, {idx_bytes / 2**30:.2f} GiB of .idx; "
          f"the run: {num_samples:,} samples of {a.seq_length}", flush=True)
    rows = []
    for case in ("baseline", "recipe"):
        for q in meta["prefixes"]:  # megatron-core's default cache dirs, inside each prefix
            shutil.rmtree(q, ignore_errors=True)
        cache = None if case == "baseline" else str(root / "index_cache")
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
        for run in ("first launch", "relaunch"):
            r = launch(meta, cache, a.ranks, num_samples, a.seq_length, a.threads)
            rows.append((case, run, r))
            print(f"  {case:8s} {run:12s}: rank 0 {r['rank0']:6.1f} s, other ranks {r['others']:6.1f} s "
                  f"(waiting included), wall {r['wall']:6.1f} s", flush=True)
    print(f"\n| path_to_cache | launch | rank 0 builds/loads (s) | other ranks (s) | wall with {a.ranks} processes (s) |")
    print("|---|---|---:|---:|---:|")
    for case, run, r in rows:
        print(f"| {'unset (baseline)' if case == 'baseline' else 'set (recipes)'} | {run} | {r['rank0']:.1f} | "
              f"{r['others']:.1f} | {r['wall']:.1f} |")
    load = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
