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

numpy, torch and megatron-core's IndexedDataset only: tests use it without Bridge's CPU mode.
The Bridge dataset provider that builds these datasets is speechlm.train.sft.PackedTTSDatasetConfig.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from speechlm.token_layout import TokenLayout

# First-fit looks for room in this many open rows, so packing stays O(pairs) and rows stay in
# roughly the shuffled order of their pairs.
OPEN_ROWS = 64


def pack_rows(lengths: np.ndarray, order: np.ndarray, capacity: int, open_rows: int = OPEN_ROWS) -> list[list[int]]:
    """Greedy first-fit of documents (visited in `order`) into rows of `capacity` tokens.

    A document goes into the oldest open row with room for it, else opens a row (closing the
    oldest when `open_rows` are open). Returns the rows, each a list of document indices.
    """
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


class PackedTTSDataset(torch.utils.data.Dataset):
    """Rows of packed TTS pairs from indexed-dataset prefixes, epoch after epoch until `num_samples`.

    Every pair is seen once per epoch; each epoch has its own seeded order. Pairs longer than a
    row are left out (data_prep drops pairs longer than seq_length already).
    """

    def __init__(self, prefixes: list[str], seq_length: int, num_samples: int, seed: int,
                 layout: TokenLayout, packed_thd: bool, name: str = "train"):
        self.seq_length, self.layout, self.packed_thd, self.name = seq_length, layout, packed_thd, name
        self._prefixes = list(prefixes)
        self._datasets: list[IndexedDataset] | None = None
        lengths, owner, index = [], [], []
        for i, prefix in enumerate(self._prefixes):
            indexed = IndexedDataset(prefix, mmap=True)  # held: its lengths are a view of its mmap
            seq_lengths = np.array(indexed.sequence_lengths, np.int64)
            del indexed
            lengths.append(seq_lengths)
            owner.append(np.full(len(seq_lengths), i, np.int32))
            index.append(np.arange(len(seq_lengths), dtype=np.int64))
        lengths, owner, index = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (lengths, owner, index))
        fits = lengths <= seq_length + 1
        self.dropped = int((~fits).sum())
        self._length, self._owner, self._index = lengths[fits], owner[fits], index[fits]
        if not len(self._length):
            raise ValueError(f"no TTS pair of at most {seq_length + 1} tokens in {', '.join(self._prefixes)}")

        rows: list[list[int]] = []
        self.epochs = 0
        while len(rows) < max(1, num_samples):
            order = np.random.default_rng([seed, self.epochs]).permutation(len(self._length))
            rows += pack_rows(self._length, order, seq_length + 1)
            self.epochs += 1
        self._row_start = np.cumsum([0] + [len(r) for r in rows])
        self._row_docs = np.fromiter((d for r in rows for d in r), np.int64)
        self.pairs = len(self._length)
        self.fill = float(self._length.sum() * self.epochs / (len(rows) * (seq_length + 1)))

    def __len__(self) -> int:
        return len(self._row_start) - 1

    def _document(self, d: int) -> np.ndarray:
        if self._datasets is None:  # opened lazily: the dataset is pickled into loader workers
            self._datasets = [IndexedDataset(p, mmap=True) for p in self._prefixes]
        return np.array(self._datasets[self._owner[d]].get(int(self._index[d])), np.int64)

    def row(self, idx: int) -> PackedRow:
        docs = self._row_docs[self._row_start[idx]: self._row_start[idx + 1]]
        return build_row([self._document(int(d)) for d in docs], self.seq_length, self.layout)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return row_to_sample(self.row(int(idx)), self.packed_thd)
