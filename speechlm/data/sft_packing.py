"""Packed text-to-speech pairs for supervised fine-tuning (SFT).

Every TTS document of the given indexed datasets (`BOS [<|lang_x|>] text <|speech_start|> s...
<|speech_end|> EOD`, one sequence each, as data_prep writes them) is packed whole, greedily, into
rows of `seq_length + 1` tokens (inputs and labels shifted by one, as GPTDataset's samples), in
an order fixed by the seed; the rest of a row is `<|pad|>`. The loss counts only what the model
must produce at inference: the codes and `<|speech_end|>` of every pair. The prompt (BOS, tag,
text, `<|speech_start|>`), EOD and padding are inputs only.

Pairs in a row must not attend to each other. On GPU the row carries THD packed-sequence
metadata (`cu_seqlens`, `cu_seqlens_argmin`, `max_seqlen`: Bridge's legacy packed keys, which
`gpt_step.get_batch` turns into `PackedSeqParams` for TransformerEngine attention). On CPU
(megatron-core's local attention, no THD) the row carries the same boundaries as a block-diagonal
causal `attention_mask` instead. RoPE is relative, so the positions continuing across pairs in
the CPU form give the same attention scores as positions restarting per pair (the THD form).

The packing (which pairs go in which row, epoch after epoch) is built once, by global rank 0, and
cached on disk as two numpy arrays that every rank memory-maps (`cache_entry`, `PackedTTSDataset`):
at 60 M pairs a per-rank pure-Python packing took minutes and GBs of RAM on every rank.
First-fit runs compiled with numba when it is installed (pure Python otherwise: same rows, slower).

numpy, torch and megatron-core's IndexedDataset only (numba optional): tests use it without
Bridge's CPU mode. The Bridge dataset provider that builds these datasets is
speechlm.train.sft.PackedTTSDatasetConfig.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from speechlm import atomic
from speechlm.token_layout import TokenLayout

# First-fit looks for room in this many open rows, so packing stays O(pairs) and rows stay in
# roughly the shuffled order of their pairs.
OPEN_ROWS = 64


# Of the packing cache: bump it whenever what the cache holds or how rows are packed changes.
CACHE_FORMAT = 1


def _first_fit(lengths, order, capacity, open_rows):
    """pack_rows on arrays (compiled by numba when installed): (row_start, row_docs, bad), row r
    being row_docs[row_start[r]:row_start[r + 1]]; bad = the position in `order` of the first
    document longer than `capacity` (nothing packed), else -1.

    Rows close oldest first, so the open rows are always the newest min(rows, open_rows) and rows
    come out in the order they were opened: each document gets a row number, then a stable
    scatter lays the rows out. Open row r's room is at r % open_rows, mirrored at + open_rows so
    the oldest-first scan reads one contiguous stretch."""
    n = len(order)
    row_of = np.empty(n, np.int64)
    room = np.zeros(2 * open_rows, np.int64)
    rows = 0
    for i in range(n):
        need = lengths[order[i]]
        if need > capacity:
            return np.zeros(1, np.int64), np.empty(0, order.dtype), i
        n_open = min(rows, open_rows)
        first = (rows - n_open) % open_rows
        j = 0
        while j < n_open and room[first + j] < need:
            j += 1
        if j == n_open:  # no open row has room: open one (the oldest closes when open_rows are open)
            r = rows
            rows += 1
            left = capacity - need
        else:
            r = rows - n_open + j
            left = room[first + j] - need
        room[r % open_rows] = left
        room[r % open_rows + open_rows] = left
        row_of[i] = r
    row_start = np.zeros(rows + 1, np.int64)
    for i in range(n):
        row_start[row_of[i] + 1] += 1
    for r in range(rows):
        row_start[r + 1] += row_start[r]
    at = row_start[:-1].copy()
    row_docs = np.empty(n, order.dtype)
    for i in range(n):
        row_docs[at[row_of[i]]] = order[i]
        at[row_of[i]] += 1
    return row_start, row_docs, -1


_kernel = None


def pack_order(lengths: np.ndarray, order: np.ndarray, capacity: int,
               open_rows: int = OPEN_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """pack_rows as arrays: (row_start, row_docs), row r = row_docs[row_start[r]:row_start[r + 1]]."""
    global _kernel
    if _kernel is None:
        try:
            import numba
        except ImportError:  # the same rows, in pure Python: fine for small sets, slow at scale
            print("WARNING: numba is not installed: SFT packing runs in pure Python (slow for millions of pairs)",
                  file=sys.stderr, flush=True)
            _kernel = _first_fit
        else:
            _kernel = numba.njit(nogil=True)(_first_fit)
    if open_rows < 1:
        raise ValueError(f"open_rows must be at least 1, not {open_rows}")
    lengths, order = np.ascontiguousarray(lengths), np.ascontiguousarray(order)
    row_start, row_docs, bad = _kernel(lengths, order, int(capacity), int(open_rows))
    if bad >= 0:
        d = int(order[bad])
        raise ValueError(f"document {d} has {int(lengths[d])} tokens: more than a row of {capacity}")
    return row_start, row_docs


def pack_rows(lengths: np.ndarray, order: np.ndarray, capacity: int, open_rows: int = OPEN_ROWS) -> list[list[int]]:
    """Greedy first-fit of documents (visited in `order`) into rows of `capacity` tokens.

    A document goes into the oldest open row with room for it, else opens a row (closing the
    oldest when `open_rows` are open). Returns the rows, each a list of document indices.
    """
    row_start, row_docs = pack_order(lengths, order, capacity, open_rows)
    docs, bounds = row_docs.tolist(), row_start.tolist()
    return [docs[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def speech_span(doc: np.ndarray, layout: TokenLayout) -> tuple[int, int]:
    """[start, end) of the codes and `<|speech_end|>` in a TTS document; ValueError otherwise."""
    decoded = layout.decode_document(doc)
    if decoded.kind != "tts":
        raise ValueError(f"not a text-to-speech pair but a {decoded.kind} document: SFT reads tts datasets only")
    end = len(doc) - 1  # EOD
    return end - len(decoded.codes) - 1, end


@dataclass
class PackedRow:
    tokens: np.ndarray  # seq_length + 1 ids: inputs [:-1], labels [1:]
    loss_mask: np.ndarray  # over the seq_length labels
    boundaries: np.ndarray  # start of each segment in input positions, then seq_length


def build_row(docs: list[np.ndarray], seq_length: int, layout: TokenLayout) -> PackedRow:
    """One packed row from whole documents (at most seq_length + 1 tokens together)."""
    row = np.full(seq_length + 1, layout.pad_id, np.int64)
    target = np.zeros(seq_length + 1, np.float32)  # by row position: is this token a target?
    starts, at = [], 0
    for doc in docs:
        if at + len(doc) > seq_length + 1:
            raise ValueError(f"documents of {sum(map(len, docs))} tokens do not fit a row of {seq_length + 1}")
        a, b = speech_span(doc, layout)
        row[at: at + len(doc)] = doc
        target[at + a: at + b] = 1.0
        starts.append(at)
        at += len(doc)
    # Segments over the seq_length input positions: one per document (the last may lose its EOD,
    # which is only ever a label) and one for the padding, if any.
    bounds = [s for s in starts if s < seq_length] + ([at] if at < seq_length else []) + [seq_length]
    return PackedRow(row, target[1:], np.array(bounds, np.int64))


def row_to_sample(row: PackedRow, packed_thd: bool) -> dict[str, torch.Tensor]:
    """The batch dict Bridge's gpt_step.get_batch reads (after default collation)."""
    seq_length = len(row.tokens) - 1
    lengths = np.diff(row.boundaries)
    segment = np.repeat(np.arange(len(lengths)), lengths)
    position_ids = np.arange(seq_length) - np.repeat(row.boundaries[:-1], lengths)
    sample = {
        "tokens": torch.from_numpy(row.tokens[:-1].copy()),
        "labels": torch.from_numpy(row.tokens[1:].copy()),
        "loss_mask": torch.from_numpy(row.loss_mask.copy()),
        "position_ids": torch.from_numpy(position_ids),
    }
    if packed_thd:
        # Fixed length (-1 padded) so rows collate; argmin = number of real entries.
        cu = np.full(seq_length + 1, -1, np.int32)
        cu[: len(row.boundaries)] = row.boundaries
        sample["cu_seqlens"] = torch.from_numpy(cu)
        sample["cu_seqlens_argmin"] = torch.tensor(len(row.boundaries))
        sample["max_seqlen"] = torch.tensor(int(lengths.max()))
    else:
        seg = torch.from_numpy(segment)
        causal = torch.ones(seq_length, seq_length, dtype=torch.bool).tril()
        # megatron-core's convention: True = masked out.
        sample["attention_mask"] = (~((seg[:, None] == seg[None, :]) & causal)).unsqueeze(0)
    return sample


class PackingCacheError(RuntimeError):
    """The packing cache cannot be written, or a rank cannot read the one rank 0 wrote."""


def _rank() -> tuple[int, bool]:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return (torch.distributed.get_rank() if distributed else 0), distributed


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


def cache_entry(prefixes: list[str], seq_length: int, num_samples: int, seed: int,
                path_to_cache: str | None = None) -> tuple[Path, dict]:
    """(directory, description) of the packing of these inputs, as megatron-core's GPTDataset keys
    its index cache: the md5 of a description of everything the rows depend on, in `path_to_cache`,
    else in `cache/PackedTTSDataset_indices/` beside the first prefix. Each .idx is identified by
    its path, size and the sha256 of its sequence lengths (the only data packing reads): a rewritten
    .idx with other lengths gets a new entry, a copied or touched one (new mtime) reuses its packing."""
    identity = []
    for prefix in prefixes:
        idx = Path(f"{prefix}.idx").resolve()
        indexed = IndexedDataset(str(prefix), mmap=True)
        identity.append({"idx": str(idx), "bytes": idx.stat().st_size, "sequences": len(indexed.sequence_lengths),
                         "lengths_sha256": _sha256(indexed.sequence_lengths)})
        del indexed
    description = {"class": "PackedTTSDataset", "format": CACHE_FORMAT, "prefixes": identity,
                   "seq_length": int(seq_length), "num_samples": max(1, int(num_samples)), "seed": int(seed),
                   "open_rows": OPEN_ROWS}
    key = hashlib.md5(json.dumps(description, sort_keys=True).encode(), usedforsecurity=False).hexdigest()
    root = Path(path_to_cache) if path_to_cache else Path(prefixes[0]).resolve().parent / "cache" / "PackedTTSDataset_indices"
    return root / f"{key}-PackedTTSDataset", description


def build_packing(description: dict) -> tuple[dict[str, np.ndarray], dict]:
    """Pack every epoch of the described inputs: ({row_start, row_docs}, stats). row_docs holds
    document numbers over the prefixes concatenated (pairs too long for a row left out)."""
    capacity, seed = description["seq_length"] + 1, description["seed"]
    lengths = [np.zeros(0, np.int32)]
    for p in description["prefixes"]:
        indexed = IndexedDataset(p["idx"][: -len(".idx")], mmap=True)
        lengths.append(np.array(indexed.sequence_lengths))  # a copy: the view dies with `indexed`'s mmap
        del indexed
    lengths = np.concatenate(lengths)
    fits = lengths <= capacity
    dropped = int((~fits).sum())
    kept = np.flatnonzero(fits) if dropped else None  # pair number -> document number
    pairs = lengths[fits] if dropped else lengths
    if not len(pairs):
        raise ValueError(f"no TTS pair of at most {capacity} tokens in "
                         f"{', '.join(p['idx'] for p in description['prefixes'])}")
    dtype = np.int32 if len(lengths) < 2**31 else np.int64
    starts, docs, rows, epochs = [np.zeros(1, np.int64)], [], 0, 0
    while rows < description["num_samples"]:
        order = np.random.default_rng([seed, epochs]).permutation(len(pairs)).astype(dtype)
        row_start, row_docs = pack_order(pairs, order, capacity)
        del order
        starts.append(row_start[1:] + starts[-1][-1])
        docs.append(kept[row_docs].astype(dtype) if kept is not None else row_docs)
        rows, epochs = rows + len(row_start) - 1, epochs + 1
    stats = {"pairs": len(pairs), "dropped": dropped, "epochs": epochs, "rows": rows,
             "fill": int(pairs.sum(dtype=np.int64)) * epochs / (rows * capacity),
             "sequences": [p["sequences"] for p in description["prefixes"]]}
    return {"row_start": np.concatenate(starts), "row_docs": np.concatenate(docs)}, stats


def _write(entry: Path, description: dict, arrays: dict[str, np.ndarray], stats: dict) -> None:
    files = {name: {"dtype": a.dtype.str, "shape": list(a.shape), "sha256": _sha256(a)} for name, a in arrays.items()}
    with atomic.atomic_path(entry, directory=True) as tmp:  # all files or none
        for name, a in arrays.items():
            np.save(tmp / f"{name}.npy", a)
        (tmp / "description.json").write_text(json.dumps({"description": description, "stats": stats, "files": files}, indent=1))


def _open(entry: Path, description: dict, verify: bool) -> tuple[dict[str, np.ndarray], dict]:
    """The cached arrays (memory-mapped) and stats; ValueError when absent, truncated, of other
    inputs or (`verify`: every byte hashed) corrupt."""
    try:
        meta = json.loads((entry / "description.json").read_text())
        if meta["description"] != description:
            raise ValueError("its description is of other inputs")
        arrays = {}
        for name, spec in meta["files"].items():
            a = np.load(entry / f"{name}.npy", mmap_mode="r")
            if a.dtype.str != spec["dtype"] or list(a.shape) != spec["shape"]:
                raise ValueError(f"{name}.npy is {a.dtype.str} {list(a.shape)}, not {spec['dtype']} {spec['shape']}")
            if verify and _sha256(a) != spec["sha256"]:
                raise ValueError(f"{name}.npy does not hash to what was written (corrupt)")
            arrays[name] = a
        start, docs = arrays["row_start"], arrays["row_docs"]
        if len(start) != meta["stats"]["rows"] + 1 or start[0] != 0 or start[-1] != len(docs):
            raise ValueError("row_start does not delimit row_docs")
        return arrays, meta["stats"]
    except (OSError, ValueError, KeyError, TypeError, EOFError) as e:  # np.load: ValueError on a short file
        raise ValueError(f"SFT packing cache {entry} unusable: {e}") from e


def load_or_build(prefixes: list[str], seq_length: int, num_samples: int, seed: int,
                  path_to_cache: str | None = None) -> tuple[Path, dict[str, np.ndarray], dict, bool]:
    """(entry, memory-mapped arrays, stats, built here). Global rank 0 checks the cache (every byte)
    and packs and writes it when absent or unusable; every rank waits at a barrier (when
    torch.distributed is initialised), then memory-maps it. One builder for the whole job, as
    megatron-core's GPTDataset: the cache is on the filesystem every rank reads the data from."""
    entry, description = cache_entry(prefixes, seq_length, num_samples, seed, path_to_cache)
    rank, distributed = _rank()
    built = False
    try:
        if rank == 0:
            try:
                _open(entry, description, verify=True)
            except ValueError as e:
                built = True
                if entry.exists():
                    print(f"WARNING: {e}; packing again", file=sys.stderr, flush=True)
            if built:
                try:
                    entry.parent.mkdir(parents=True, exist_ok=True)
                    if not os.access(entry.parent, os.W_OK):
                        raise PermissionError("not writable")
                except OSError as e:
                    raise PackingCacheError(
                        f"cannot write the SFT packing cache in {entry.parent} ({e}): set dataset.path_to_cache "
                        f"to a writable directory that every rank can read") from e
                arrays, stats = build_packing(description)
                _write(entry, description, arrays, stats)
                del arrays
    finally:
        if distributed:
            torch.distributed.barrier()  # rank 0 passes it on failure too (then raises): nobody hangs
    try:
        arrays, stats = _open(entry, description, verify=False)
    except ValueError as e:
        raise PackingCacheError(
            f"rank {rank}: {e}. Rank 0 packs and writes it before this rank reads it: rank 0 failed "
            f"(see its error), or {entry.parent} is not on a filesystem that every node shares "
            f"(set dataset.path_to_cache)") from e
    return entry, arrays, stats, built


class PackedTTSDataset(torch.utils.data.Dataset):
    """Rows of packed TTS pairs from indexed-dataset prefixes, epoch after epoch until `num_samples`.

    Every pair is seen once per epoch; each epoch has its own seeded order. Pairs longer than a
    row are left out (data_prep drops pairs longer than seq_length already). The packing is the
    cached `row_start` / `row_docs` arrays (load_or_build), memory-mapped: row i holds documents
    row_docs[row_start[i]:row_start[i + 1]], numbered over the prefixes concatenated.
    """

    def __init__(self, prefixes: list[str], seq_length: int, num_samples: int, seed: int,
                 layout: TokenLayout, packed_thd: bool, name: str = "train", path_to_cache: str | None = None):
        self.seq_length, self.layout, self.packed_thd, self.name = seq_length, layout, packed_thd, name
        self._prefixes = [str(p) for p in prefixes]
        if not self._prefixes:
            raise ValueError("no TTS prefix to pack")
        self._datasets: list[IndexedDataset] | None = None
        self.cache, arrays, stats, self.cache_built = load_or_build(self._prefixes, seq_length, num_samples, seed,
                                                                    path_to_cache)
        self._row_start, self._row_docs = arrays["row_start"], arrays["row_docs"]
        self.pairs, self.dropped, self.epochs, self.fill = stats["pairs"], stats["dropped"], stats["epochs"], stats["fill"]
        self._first_doc = np.cumsum([0] + stats["sequences"])  # document number of each prefix's first sequence

    def __getstate__(self) -> dict:  # loader workers map the cache themselves rather than copy it
        return {k: v for k, v in self.__dict__.items() if k not in ("_row_start", "_row_docs", "_datasets")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _datasets=None)
        self._row_start = np.load(self.cache / "row_start.npy", mmap_mode="r")
        self._row_docs = np.load(self.cache / "row_docs.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self._row_start) - 1

    def _document(self, d: int) -> np.ndarray:
        if self._datasets is None:  # opened lazily: the dataset is pickled into loader workers
            self._datasets = [IndexedDataset(p, mmap=True) for p in self._prefixes]
        owner = int(np.searchsorted(self._first_doc, d, side="right")) - 1
        return np.array(self._datasets[owner].get(d - int(self._first_doc[owner])), np.int64)

    def row(self, idx: int) -> PackedRow:
        docs = self._row_docs[self._row_start[idx]: self._row_start[idx + 1]]
        return build_row([self._document(int(d)) for d in docs], self.seq_length, self.layout)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return row_to_sample(self.row(int(idx)), self.packed_thd)
