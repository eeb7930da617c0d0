"""SFT packing built once and cached (issue 19): the cached, compiled packing gives exactly the
rows of the pure-Python implementation it replaced (kept here as the reference), the cache is
reused, keyed by its inputs, never used when damaged, and built by rank 0 only.

The 2-rank check runs this file as a torchrun script (`python tests/test_sft_packing.py ranks ...`).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # when run as a script

from speechlm.data import sft_packing  # noqa: E402
from speechlm.data.sft_packing import PackedTTSDataset, PackingCacheError  # noqa: E402
from speechlm.token_layout import TokenLayout  # noqa: E402


# --- the reference: speechlm/data/sft_packing.py as of commit 86542ba, verbatim ----------------------


def reference_pack_rows(lengths: np.ndarray, order: np.ndarray, capacity: int, open_rows: int = 64) -> list[list[int]]:
    closed: list[list[int]] = []
    rows: list[list[int]] = []
    room = np.zeros(open_rows, np.int64)
    for d in order:
        n = int(lengths[d])
        if n > capacity:
            raise ValueError(f"document {int(d)} has {n} tokens: more than a row of {capacity}")
        fit = np.flatnonzero(room[: len(rows)] >= n)
        if fit.size:
            j = int(fit[0])
            rows[j].append(int(d))
            room[j] -= n
            continue
        if len(rows) == open_rows:
            closed.append(rows.pop(0))
            room[:-1] = room[1:].copy()
        rows.append([int(d)])
        room[len(rows) - 1] = capacity - n
    return closed + rows


class ReferencePacking:
    """The packing half of the old PackedTTSDataset.__init__ (bench/sft_packing.py's baseline)."""

    def __init__(self, prefixes: list[str], seq_length: int, num_samples: int, seed: int):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        lengths, owner, index = [], [], []
        for i, prefix in enumerate(prefixes):
            indexed = IndexedDataset(prefix, mmap=True)
            seq_lengths = np.array(indexed.sequence_lengths, np.int64)
            del indexed
            lengths.append(seq_lengths)
            owner.append(np.full(len(seq_lengths), i, np.int32))
            index.append(np.arange(len(seq_lengths), dtype=np.int64))
        lengths, owner, index = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (lengths, owner, index))
        fits = lengths <= seq_length + 1
        self.dropped = int((~fits).sum())
        self._length, self._owner, self._index = lengths[fits], owner[fits], index[fits]
        rows: list[list[int]] = []
        self.epochs = 0
        while len(rows) < max(1, num_samples):
            order = np.random.default_rng([seed, self.epochs]).permutation(len(self._length))
            rows += reference_pack_rows(self._length, order, seq_length + 1)
            self.epochs += 1
        self._row_start = np.cumsum([0] + [len(r) for r in rows])
        self._row_docs = np.fromiter((d for r in rows for d in r), np.int64)
        self.pairs = len(self._length)
        self.fill = float(self._length.sum() * self.epochs / (len(rows) * (seq_length + 1)))


# --- data -------------------------------------------------------------------------------------------


def write_index(prefix: Path, lengths: np.ndarray) -> Path:
    """A real megatron-core .idx of these sequence lengths (int32 tokens, one document each) and a
    sparse .bin of the right size: enough for packing, which reads lengths only."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    lengths = np.asarray(lengths, np.int32)
    pointers = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * 4, out=pointers[1:])
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(_INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", DType.code_from_dtype(np.int32)))
        f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(lengths) + 1))
        f.write(lengths.tobytes() + pointers.tobytes() + np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(int(lengths.sum(dtype=np.int64)) * 4)
    return prefix


def tts_lengths(n: int, seed: int) -> np.ndarray:
    """Pair lengths as the brief's TTS data: 20-60 text tokens + 50 codes/s for 2-15 s, + 5 specials."""
    rng = np.random.default_rng(seed)
    return rng.integers(20, 61, n) + np.round(50 * rng.uniform(2, 15, n)).astype(np.int64) + 5


DISTRIBUTIONS = {  # (lengths, capacity)
    "tts": lambda rng, n: (tts_lengths(n, int(rng.integers(1 << 30))), 2049),
    "small": lambda rng, n: (rng.integers(1, 40, n), 65),
    "bimodal": lambda rng, n: (np.where(rng.random(n) < 0.5, rng.integers(1, 10, n), rng.integers(50, 65, n)), 65),
    "near_full": lambda rng, n: (rng.integers(60, 66, n), 65),  # mostly one pair a row, some exactly full
    "equal": lambda rng, n: (np.full(n, 13), 65),
}


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compiled_first_fit_gives_the_reference_rows(dist, seed):
    rng = np.random.default_rng(seed)
    lengths, capacity = DISTRIBUTIONS[dist](rng, 3000)
    order = rng.permutation(len(lengths))
    for open_rows in (1, 3, 64):
        assert sft_packing.pack_rows(lengths, order, capacity, open_rows) == reference_pack_rows(lengths, order, capacity, open_rows)
    subset = order[: len(order) // 3]  # an order that visits only some documents
    assert sft_packing.pack_rows(lengths, subset, capacity) == reference_pack_rows(lengths, subset, capacity)


def test_too_long_document_is_refused_as_before():
    lengths, order = np.array([10, 70, 5]), np.array([0, 2, 1])
    with pytest.raises(ValueError, match="document 1 has 70 tokens: more than a row of 65"):
        sft_packing.pack_rows(lengths, order, 65)
    with pytest.raises(ValueError, match="document 1 has 70 tokens"):
        reference_pack_rows(lengths, order, 65)


def _ds(prefixes, num_samples=1, seed=0, seq_length=2048, **kw) -> PackedTTSDataset:
    return PackedTTSDataset([str(p) for p in prefixes], seq_length, num_samples, seed, TokenLayout(), False, **kw)


def _reference_rows(ref: ReferencePacking, first_doc: np.ndarray) -> list[list[int]]:
    """The reference's rows as document numbers over the prefixes concatenated (the cache's numbering)."""
    docs = (first_doc[ref._owner] + ref._index)[ref._row_docs]
    return [docs[a:b].tolist() for a, b in zip(ref._row_start[:-1], ref._row_start[1:])]


def _rows(ds: PackedTTSDataset) -> list[list[int]]:
    return [ds._row_docs[a:b].tolist() for a, b in zip(ds._row_start[:-1], ds._row_start[1:])]


@pytest.mark.parametrize("seed,epochs_wanted", [(0, 1), (5, 3)])
def test_cached_dataset_rows_equal_the_reference(tmp_path, seed, epochs_wanted):
    # Two prefixes of different distributions, some pairs too long for a row (left out).
    a = write_index(tmp_path / "a" / "tts_hi", tts_lengths(4000, seed))
    b = write_index(tmp_path / "a" / "tts_ta", np.concatenate([tts_lengths(1500, seed + 1), [2050, 2049, 3000]]))
    rows_one_epoch = len(ReferencePacking([str(a), str(b)], 2048, 1, seed)._row_start) - 1
    num_samples = (epochs_wanted - 1) * rows_one_epoch + 1
    ref = ReferencePacking([str(a), str(b)], 2048, num_samples, seed)
    ds = _ds([a, b], num_samples, seed)
    assert ref.epochs == ds.epochs == epochs_wanted and ds.dropped == ref.dropped == 2
    assert (ds.pairs, len(ds), ds.fill) == (ref.pairs, len(ref._row_start) - 1, ref.fill)
    assert _rows(ds) == _reference_rows(ref, ds._first_doc)
    assert ds.cache.parent == tmp_path / "a" / "cache" / "PackedTTSDataset_indices"  # beside the first prefix
    assert isinstance(ds._row_docs, np.memmap) and isinstance(ds._row_start, np.memmap)
    assert ds._row_docs.dtype == np.int32  # 4 bytes a pair


def test_rows_read_the_right_documents(tmp_path):
    """Tokens: a row of the cached dataset is the reference's row, read from two real datasets."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    layout = TokenLayout()
    rng = np.random.default_rng(0)
    prefixes = []
    for name, n in (("hi", 120), ("ta", 80)):
        prefix = tmp_path / f"tts_{name}"
        builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
        for _ in range(n):
            doc = layout.tts_document(rng.integers(1_000, 20_000, int(rng.integers(1, 6))),
                                      rng.integers(0, 65_536, int(rng.integers(3, 40))), name)
            builder.add_document(np.asarray(doc), [len(doc)])
        builder.finalize(f"{prefix}.idx")
        prefixes.append(str(prefix))
    ds, ref = _ds(prefixes, 100, 3, seq_length=96), ReferencePacking(prefixes, 96, 100, 3)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = [IndexedDataset(p) for p in prefixes]
    for i in range(len(ds)):
        docs = ref._row_docs[ref._row_start[i]: ref._row_start[i + 1]]
        want = sft_packing.build_row([np.array(indexed[ref._owner[d]].get(int(ref._index[d])), np.int64) for d in docs], 96, layout)
        assert np.array_equal(ds.row(i).tokens, want.tokens) and np.array_equal(ds.row(i).loss_mask, want.loss_mask)
    import pickle

    clone = pickle.loads(pickle.dumps(ds))  # what a spawned loader worker gets: the cache, not a copy of it
    assert len(pickle.dumps(ds)) < 10_000 and np.array_equal(clone.row(7).tokens, ds.row(7).tokens)


class _Counter:
    def __init__(self, monkeypatch):
        self.calls, real = 0, sft_packing.build_packing

        def counted(*args, **kw):
            self.calls += 1
            return real(*args, **kw)

        monkeypatch.setattr(sft_packing, "build_packing", counted)


def _entries(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if not p.name.startswith(".")}


def test_cache_is_reused_and_keyed_by_its_inputs(tmp_path, monkeypatch):
    packs = _Counter(monkeypatch)
    a = write_index(tmp_path / "d" / "a", tts_lengths(3000, 0))
    b = write_index(tmp_path / "d" / "b", tts_lengths(2000, 1))
    first = _ds([a], 10, seed=1)
    files = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in first.cache.iterdir()}
    assert packs.calls == 1 and first.cache_built
    again = _ds([a], 10, seed=1)
    assert packs.calls == 1 and not again.cache_built  # not packed again...
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in again.cache.iterdir()} == files  # ...nor written
    assert _rows(again) == _rows(first)
    root = first.cache.parent
    assert _entries(root) == {first.cache.name}
    # Each changed input: a new entry (and a packing).
    for changed in (dict(prefixes=[a], seed=2), dict(prefixes=[a, b], seed=1), dict(prefixes=[a], seed=1, num_samples=5000),
                    dict(prefixes=[a], seed=1, seq_length=1024)):
        ds = _ds(**{"num_samples": 10, **changed})
        assert ds.cache_built and ds.cache.name not in {first.cache.name}
    assert packs.calls == 5 and len(_entries(root)) == 5
    # The .idx rewritten with other lengths (same path, same size): a new entry, the new rows.
    write_index(a, tts_lengths(3000, 7))
    rewritten = _ds([a], 10, seed=1)
    assert rewritten.cache_built and rewritten.cache != first.cache and packs.calls == 6
    assert _rows(rewritten) == _reference_rows(ReferencePacking([str(a)], 2048, 10, 1), rewritten._first_doc)
    # Touched (a new mtime, the same lengths): the same packing, reused.
    os.utime(f"{a}.idx", ns=(1, 1))
    assert _ds([a], 10, seed=1).cache == rewritten.cache and packs.calls == 6
    # dataset.path_to_cache: there instead.
    elsewhere = _ds([a], 10, seed=1, path_to_cache=str(tmp_path / "shared_cache"))
    assert elsewhere.cache.parent == tmp_path / "shared_cache" and elsewhere.cache.name == rewritten.cache.name
    assert packs.calls == 7


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_description", "other_description"])
def test_a_damaged_cache_is_rebuilt_never_used(tmp_path, monkeypatch, capsys, damage):
    a = write_index(tmp_path / "a", tts_lengths(3000, 0))
    good = _ds([a], 10)
    want = _rows(good)
    docs = good.cache / "row_docs.npy"
    del good
    if damage == "truncate":
        os.truncate(docs, docs.stat().st_size - 100)
    elif damage == "flip_byte":  # same size, same header: only the hash of every byte sees it
        data = bytearray(docs.read_bytes())
        data[-9] ^= 0x01
        docs.write_bytes(bytes(data))
    elif damage == "no_description":
        (docs.parent / "description.json").unlink()
    else:
        meta = json.loads((docs.parent / "description.json").read_text())
        meta["description"]["seed"] = 99
        (docs.parent / "description.json").write_text(json.dumps(meta))
    packs = _Counter(monkeypatch)
    again = _ds([a], 10)
    assert packs.calls == 1 and again.cache_built and _rows(again) == want
    assert "unusable" in capsys.readouterr().err
    assert packs.calls == 1 and not _ds([a], 10).cache_built  # the rebuilt cache is sound


def test_an_unwritable_cache_location_is_a_clear_error(tmp_path):
    a = write_index(tmp_path / "a", tts_lengths(300, 0))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")  # (the tests may run as root: permissions would not stop it)
    with pytest.raises(PackingCacheError, match="cannot write the SFT packing cache in .*set dataset.path_to_cache"):
        _ds([a], 10, path_to_cache=str(blocker / "cache"))


# --- two ranks (gloo) -------------------------------------------------------------------------------


def _ranks_worker(prefix: str, cache: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    calls = []
    real = sft_packing.build_packing
    sft_packing.build_packing = lambda *a, **k: calls.append(1) or real(*a, **k)
    report = {}
    ds = _ds([prefix], 50, seed=4, path_to_cache=cache)
    report["packed"], report["built"], report["rows"] = len(calls), ds.cache_built, _rows(ds)
    ds2 = _ds([prefix], 50, seed=4, path_to_cache=cache)
    report["packed_again"] = len(calls) - report["packed"]
    try:  # rank 0 cannot write: every rank fails, none hangs at the barrier
        _ds([prefix], 50, seed=4, path_to_cache=str(Path(cache) / "description.txt" / "x"))
        report["error"] = ""
    except PackingCacheError as e:
        report["error"] = str(e)
    del ds2
    Path(f"{out}.{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_rank_zero_packs_every_rank_reads(tmp_path):
    from conftest import run_torchrun

    prefix = write_index(tmp_path / "data" / "tts", tts_lengths(20_000, 3))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "description.txt").write_text("a file where rank 0 would need a directory")
    rc, log = run_torchrun(2, [__file__, "ranks", str(prefix), str(cache), str(tmp_path / "out")], tmp_path / "log", timeout=300)
    assert rc == 0, log[-4000:]
    r0, r1 = (json.loads((tmp_path / f"out.{r}.json").read_text()) for r in (0, 1))
    assert (r0["packed"], r0["built"], r1["packed"], r1["built"]) == (1, True, 0, False)
    assert r0["packed_again"] == r1["packed_again"] == 0
    assert r0["rows"] == r1["rows"] == _reference_rows(ReferencePacking([str(prefix)], 2048, 50, 4), np.array([0]))
    assert "cannot write the SFT packing cache" in r0["error"], r0["error"]
    assert r1["error"].startswith("rank 1: ") and "Rank 0 packs and writes it" in r1["error"], r1["error"]


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "ranks":
    _ranks_worker(*sys.argv[2:])
