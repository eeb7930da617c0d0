"""Build Megatron indexed datasets of speech documents from WebDataset shards.

A shard's samples are decoded and checked (`speech_samples`), turned into audio or TTS documents
of the token layout here, and written as the shard's partial datasets; the output directory,
done records and task loop are `partials`, the merge and manifest `merge`:
  build.json, partials/<shard-id>/ (one finished shard + done.json),
  <kind>_<lang>_train.bin/.idx, <kind>_<lang>_valid.bin/.idx, manifest.json
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from speechlm import token_layout as tl
from speechlm.data import merge as merge_mod
from speechlm.data import s3
from speechlm.data.inputs import missing_object_code
from speechlm.data.model_dir import encode_texts_flat, load_model_dir
from speechlm.data.partials import DTYPE, SPLITS, BuildSettings, PartialWriter, SpeechDataError, run_partials
from speechlm.data.shards import CorruptShardError, expand_spec, iter_samples, open_shard
from speechlm.data.speech_samples import Kind, Sample, SampleDecoder, Schema, codes_in_range
from speechlm.token_layout import TokenLayout

# Samples per batch: one codes_to_ids call and one write per prefix (audio), one tokenizer call
# (tts). Audio batches stay small: above ~50k codes numpy's temporaries become fresh mmaps whose
# page faults cost ~30 ns a code (codes_to_ids: ~1 us a segment at 32, ~37 us at 64+ segments).
_AUDIO_BATCH = 32
_TTS_BATCH = 256
COUNTS = ("samples", "documents", "tokens", "codes")  # per split of a dataset


@dataclass(frozen=True)
class Settings(BuildSettings):
    """Everything that decides the output bytes. Tasks of one build must agree on all of it."""

    kind: Kind
    seq_length: int = 2048
    valid_fraction: float = 0.01
    schema: Schema = field(default_factory=Schema)
    default_language: str | None = None
    layout_hash: str = ""
    tokenizer_sha256: str | None = None  # tts only: the transcript ids depend on it


# --- one shard ---------------------------------------------------------------------------------
class _ShardWriter(PartialWriter):
    """The partials of one shard; documents come in batches, already concatenated."""

    COUNTS = COUNTS
    EXTRA = {"declared_seconds": 0.0}

    def write(self, language: str, split: str, flat: np.ndarray, lengths: list[int], counts: list) -> None:
        """Append documents (concatenated in `flat`, one length each) to a prefix.

        Same bytes as one `add_document(doc, [len(doc)])` per document, in one write: per-document
        calls cost more than everything else a sample needs (see docs/data_prep.md).
        """
        b = self.builder(language, split)
        b.data_file.write(np.ascontiguousarray(flat, dtype=DTYPE))
        n = len(b.sequence_lengths)
        b.sequence_lengths.extend(lengths)
        b.document_indices.extend(range(n + 1, n + 1 + len(lengths)))
        ds = self.ds(language)
        sp = ds[split]
        sp["samples"] += counts[0]
        sp["codes"] += counts[1]
        ds["declared_seconds"] += counts[2]
        sp["documents"] += len(lengths)
        sp["tokens"] += int(flat.size)


class ShardProcessor:
    """Turns shards into partial datasets; holds what every shard needs (layout, tokenizer)."""

    def __init__(self, settings: Settings, layout: TokenLayout, tokenizer: Any = None, client_factory=None):
        self.settings, self.layout, self.tokenizer = settings, layout, tokenizer
        self.client_factory = client_factory or s3.make_client
        self._client = None
        self.decoder = SampleDecoder(settings.kind, settings.schema, settings.default_language, settings.valid_fraction)
        self._audio_cap = layout.max_codes_per_audio_document(settings.seq_length)
        self._frames: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._tts_frames: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def client(self):
        if self._client is None:
            self._client = self.client_factory()
        return self._client

    def _audio_frame(self, language: str) -> tuple[np.ndarray, np.ndarray]:
        """The tokens of an audio document before and after its codes, taken from the layout."""
        frame = self._frames.get(language)
        if frame is None:
            doc = self.layout.audio_document(np.zeros(1, np.int64), language)
            at = np.flatnonzero(tl.is_speech(doc))
            assert len(at) == 1, "audio document is not head + codes + tail"
            frame = self._frames[language] = (doc[: at[0]], doc[at[0] + 1 :])
        return frame

    def _emit_audio(self, w: _ShardWriter, batch: list[Sample]) -> None:
        """Audio documents of a batch. The layout turns all codes of the batch into ids in one
        call and gives the frame around them; the first document of each batch is checked
        against `layout.audio_document` itself, so the two can never drift apart."""
        layout, seq, cap = self.layout, self.settings.seq_length, self._audio_cap
        pieces = [layout.split_audio_codes(p.codes, seq) if len(p.codes) > cap else [p.codes] for p in batch]
        ids = tl.codes_to_ids(np.concatenate([c for ps in pieces for c in ps]))
        groups: dict[tuple[str, str], tuple[list[np.ndarray], list[int], list]] = {}  # parts, lengths, counts
        o = 0
        for p, ps in zip(batch, pieces):
            head, tail = self._audio_frame(p.language)
            parts, lengths, counts = groups.setdefault((p.language, p.split), ([], [], [0, 0, 0.0]))
            for c in ps:
                n = len(c)
                parts += (head, ids[o : o + n], tail)
                lengths.append(len(head) + n + len(tail))
                o += n
            counts[0] += 1
            counts[1] += len(p.codes)
            counts[2] += p.duration
            if len(ps) > 1:
                w.ds(p.language)["split_samples"] += 1
        p0 = batch[0]
        first = np.concatenate(groups[(p0.language, p0.split)][0][:3])
        if not np.array_equal(first, layout.audio_document(pieces[0][0], p0.language)):
            raise AssertionError("audio document frame differs from token_layout.audio_document")
        for (language, split), (parts, lengths, counts) in groups.items():
            w.write(language, split, np.concatenate(parts), lengths, counts)

    def _tts_frame(self, language: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(BOS [tag], <|speech_start|>, <|speech_end|> EOD) of a TTS document, from the layout."""
        frame = self._tts_frames.get(language)
        if frame is None:
            doc = self.layout.tts_document(np.zeros(0, np.int64), np.zeros(1, np.int64), language)
            at = np.flatnonzero(tl.is_speech(doc))
            assert len(at) == 1, "tts document is not prompt + codes + tail"
            frame = self._tts_frames[language] = (doc[: at[0] - 1], doc[at[0] - 1 : at[0]], doc[at[0] + 1 :])
        return frame

    def _emit_tts(self, w: _ShardWriter, batch: list[Sample]) -> None:
        """TTS documents of a batch: one tokenizer call and one check of all transcripts' ids;
        pairs that do not fit are dropped. The text ids come as one array for the whole batch."""
        layout, seq = self.layout, self.settings.seq_length
        flat, n_ids = encode_texts_flat(self.tokenizer, [p.text for p in batch])
        n_codes = np.fromiter([len(p.codes) for p in batch], np.int64, len(batch))
        fits = (n_ids > 0) & (n_codes <= layout.max_codes_per_tts_document(seq, n_ids))
        keep = batch
        if not fits.all():
            for p, ok, n in zip(batch, fits.tolist(), n_ids.tolist()):
                if not ok:
                    w.skip("empty_text" if n == 0 else "too_long", p.language)
            keep = [p for p, ok in zip(batch, fits.tolist()) if ok]
            flat, n_ids = flat[np.repeat(fits, n_ids)], n_ids[fits]
            if not keep:
                return
        ends = [0, *np.cumsum(n_ids).tolist()]
        try:  # tts_prompt refuses any id that is not a plain text token
            layout.tts_prompt(flat, keep[0].language)
        except ValueError:  # find the culprits one by one
            good = []
            for k, p in enumerate(keep):
                try:
                    layout.tts_prompt(flat[ends[k] : ends[k + 1]], p.language)
                    good.append(k)
                except ValueError:
                    w.skip("bad_text", p.language)
            if not good:
                return
            keep = [keep[k] for k in good]
            flat = np.concatenate([flat[ends[k] : ends[k + 1]] for k in good])
            ends = [0, *np.cumsum([ends[k + 1] - ends[k] for k in good]).tolist()]
        for i in range(0, len(keep), _AUDIO_BATCH):  # small chunks: see _AUDIO_BATCH
            self._write_tts(w, keep[i : i + _AUDIO_BATCH], flat, ends, i, check=i == 0)

    def _write_tts(self, w: _ShardWriter, items: list[Sample], flat: np.ndarray, ends: list[int], first: int,
                   check: bool) -> None:
        """Like _emit_audio: all codes of the chunk become ids in one call and the frame comes from
        the layout; with `check` (the first chunk of a batch) the first document is compared with
        `layout.tts_document`. Text ids of item k are flat[ends[first + k] : ends[first + k + 1]]
        (already checked by the layout)."""
        code_ids = tl.codes_to_ids(np.concatenate([p.codes for p in items]))
        frames = self._tts_frames
        groups: dict[tuple[str, str], tuple[list[Any], list[int], list]] = {}
        o = 0
        for k, p in enumerate(items, first):
            frame = frames.get(p.language) or self._tts_frame(p.language)
            g = groups.get((p.language, p.split))
            if g is None:
                g = groups[(p.language, p.split)] = ([], [], [0, 0, 0.0])
            parts, lengths, counts = g
            head, start, tail = frame
            a, b = ends[k], ends[k + 1]
            n = len(p.codes)
            parts += (head, flat[a:b], start, code_ids[o : o + n], tail)
            lengths.append(len(head) + (b - a) + 1 + n + len(tail))
            o += n
            counts[0] += 1
            counts[1] += n
            counts[2] += p.duration
        p0 = items[0]
        if check and not np.array_equal(np.concatenate(groups[(p0.language, p0.split)][0][:5]),
                                        self.layout.tts_document(flat[ends[first] : ends[first + 1]], p0.codes, p0.language)):
            raise AssertionError("tts document frame differs from token_layout.tts_document")
        for (language, split), (parts, lengths, counts) in groups.items():
            w.write(language, split, np.concatenate(parts), lengths, counts)

    def process(self, url: str, tmp: Path) -> dict[str, Any]:
        """Write the partial datasets of one shard into `tmp`; return its done record.

        A corrupt/truncated/missing shard is recorded in the record (samples completed before the
        damage are kept); a transient read error that outlasts the retries propagates, so the
        shard is not marked done and a rerun tries it again.
        """
        w = _ShardWriter(tmp, self.settings.kind)
        error = None
        batch: list[Sample] = []
        emit = self._emit_tts if self.settings.kind == "tts" else self._emit_audio
        batch_size = _TTS_BATCH if self.settings.kind == "tts" else _AUDIO_BATCH
        decode, skip = self.decoder.decode, w.skip

        def flush(samples: list[Sample]) -> None:
            if samples := codes_in_range(samples, skip):
                emit(w, samples)

        try:
            with open_shard(url, self.client if url.startswith("s3://") else None) as f:
                for key, fields in iter_samples(f):
                    w.samples_read += 1
                    p = decode(key, fields, skip)
                    if p is not None:
                        batch.append(p)
                        if len(batch) >= batch_size:
                            full, batch = batch, []
                            flush(full)
        except (CorruptShardError, gzip.BadGzipFile, EOFError, zlib.error, UnicodeDecodeError) as e:
            error = f"corrupt: {e}"
        except FileNotFoundError as e:
            error = f"missing: {e}"
        except Exception as e:
            code = missing_object_code(e)
            if code is None:
                raise
            error = f"missing: {url} ({code})"
        if batch:  # samples completed before a corruption are kept
            flush(batch)
        return w.record(url, self.settings.fingerprint, error)


# --- a task ------------------------------------------------------------------------------------
def run_task(
    inputs: str | list[str],
    model_dir: str | Path,
    output: str | Path,
    kind: Kind,
    *,
    seq_length: int = 2048,
    valid_fraction: float = 0.01,
    schema: Schema | None = None,
    default_language: str | None = None,
    num_tasks: int = 1,
    task_index: int = 0,
    s3_settings: s3.S3Settings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Process this task's shards into partials (skipping finished ones). Returns a summary with
    `failed` (shards that hit a non-data error, e.g. S3 down past the retries; rerun for them)."""
    if kind not in ("audio", "tts"):
        raise SpeechDataError(f"kind must be audio or tts, got {kind!r}")
    if default_language is not None and default_language not in tl.LANGUAGES:
        raise SpeechDataError(f"unknown --language {default_language!r}; known: {', '.join(tl.LANGUAGES)}")
    if not 0 <= valid_fraction < 1:
        raise SpeechDataError(f"valid fraction must be in [0, 1), got {valid_fraction}")
    layout, tokenizer, tok_sha = load_model_dir(model_dir, need_tokenizer=kind == "tts")
    layout.max_codes_per_audio_document(seq_length)  # refuses a sequence length with no room
    settings = Settings(kind, seq_length, valid_fraction, schema or Schema(), default_language, layout.layout_hash, tok_sha)
    s3s = s3_settings or s3.S3Settings.from_env()
    client_factory = lambda: s3.make_client(s3s)  # noqa: E731
    try:
        shards = expand_spec(inputs, client_factory)
    except FileNotFoundError as e:  # a pattern or directory with no shards: nothing is written
        raise SpeechDataError(str(e)) from None
    build_record = {
        "version": merge_mod.MANIFEST_VERSION,
        "inputs": [inputs] if isinstance(inputs, str) else list(inputs),
        "model": str(model_dir),
        "layout_hash": layout.layout_hash,
        "layout": layout.to_dict(),
        "settings": settings.to_dict(),
        "shards": shards,
    }
    proc = ShardProcessor(settings, layout, tokenizer, client_factory)
    mine, failed = run_partials(proc, Path(output), build_record, settings.fingerprint, num_tasks=num_tasks,
                                task_index=task_index, progress=progress, unit="shard")
    return {"shards": len(shards), "task_shards": len(mine), "failed": failed, "settings": settings}


# --- merge -------------------------------------------------------------------------------------
def _fingerprint(settings: dict[str, Any]) -> str:
    return Settings(**{**settings, "schema": Schema(**settings["schema"])}).fingerprint


def _hours(codes: float) -> float:
    return round(codes / tl.CODES_PER_SECOND / 3600, 6)


def _manifest(m: merge_mod.Merged) -> dict[str, Any]:
    """The shared manifest plus the layout and hours (of codes written, and as declared)."""
    kind = m.build["settings"]["kind"]
    out = merge_mod.manifest(m, kind=kind, stem=kind, counts=COUNTS, inputs_key="shards")
    out["layout"] = m.build["layout"]
    for name, entry in out["datasets"].items():
        for split in SPLITS:
            entry[split]["hours"] = _hours(entry[split]["codes"])
        entry["declared_hours"] = round(m.datasets[name].get("declared_seconds", 0.0) / 3600, 6)
    out["totals"]["hours"] = _hours(out["totals"]["codes"])
    return out


_MERGE = merge_mod.Spec(tool="build_speech.py", error=SpeechDataError, unit="shard", inputs="shards",
                        fingerprint=_fingerprint, manifest=_manifest)


def merge(output: str | Path, progress: bool = True) -> dict[str, Any]:
    """Combine every shard's partials into the final prefixes and write manifest.json
    (`merge.merge`). Refuses while any shard is not done."""
    return merge_mod.merge(output, _MERGE, progress)


def build(
    inputs: str | list[str],
    model_dir: str | Path,
    output: str | Path,
    kind: Kind,
    *,
    merge_after: bool = True,
    **kw: Any,
) -> dict[str, Any]:
    """run_task, then merge when this task completed without failures and merge_after is set.
    Returns the run_task summary with `manifest` added when merged."""
    summary = run_task(inputs, model_dir, output, kind, **kw)
    if summary["failed"]:
        return summary
    if merge_after:
        summary["manifest"] = merge(output, progress=kw.get("progress", True))
    return summary


def format_manifest(m: dict[str, Any]) -> str:
    """A short human summary of a manifest."""
    t = m["totals"]
    lines = [
        f"{m['kind']}: {t['documents']:,} documents, {t['tokens']:,} tokens, {t['hours']:,.2f} h from "
        f"{m['samples_read']:,} samples in {m['shards']['total']} shards (layout {m['layout_hash'][:12]})"
    ]
    for name, d in m["datasets"].items():
        tr, va = d["train"], d["valid"]
        sk = sum(d["skips"].values())
        lines.append(
            f"  {name}: train {tr['documents']:,} docs {tr['hours']:.2f} h | valid {va['documents']:,} docs "
            f"{va['hours']:.2f} h | split {d['split_samples']:,} | skipped {sk:,}"
        )
    if m["skips"]:
        lines.append("  skipped: " + ", ".join(f"{k} {v:,}" for k, v in m["skips"].items()))
    for b in m["shards"]["bad"]:
        lines.append(f"  BAD SHARD {b['shard']}: {b['error']} ({b['samples_read']} samples read before)")
    return "\n".join(lines)


def iter_documents(prefix: str | Path, start: int = 0, n: int | None = None) -> Iterable[np.ndarray]:
    """Documents of a built prefix, as id arrays (for inspection and tests)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    stop = len(ds) if n is None else min(len(ds), start + n)
    for i in range(start, stop):
        yield np.asarray(ds[i])

