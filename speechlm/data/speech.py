"""Build Megatron indexed datasets of speech documents from WebDataset shards.

Layout of an output directory:
  build.json                  settings and the sorted shard list, written by the first task
  partials/<shard-id>/        one finished shard: <prefix>.bin/.idx + done.json (the marker)
  <kind>_<lang>_train.bin/.idx, <kind>_<lang>_valid.bin/.idx   merged datasets
  manifest.json               what was written, what was skipped and why, layout hash, settings

Determinism: a partial depends only on the shard's bytes and the settings; the merge
concatenates partials in sorted shard order. So the merged bytes do not depend on the number
of tasks, on which task did which shard, or on a task being killed and rerun.
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from speechlm import s3
from speechlm import token_layout as tl
from speechlm.data.shards import CorruptShardError, expand_spec, iter_samples, open_shard
from speechlm.token_layout import TokenLayout

log = logging.getLogger(__name__)

Kind = Literal["audio", "tts"]
SPLITS = ("train", "valid")
BUILD_FILE = "build.json"
MANIFEST_FILE = "manifest.json"
PARTIALS = "partials"
DONE_FILE = "done.json"
MANIFEST_VERSION = 1
DTYPE = np.int32  # ids reach 193,791: more than uint16 holds
# Samples per batch: one codes_to_ids call and one write per prefix (audio), one tokenizer call
# (tts). Audio batches stay small: above ~50k codes numpy's temporaries become fresh mmaps whose
# page faults cost ~30 ns a code (codes_to_ids: ~1 us a segment at 32, ~37 us at 64+ segments).
_AUDIO_BATCH = 32
_TTS_BATCH = 256

# Reasons a sample is not written, in the order they are checked (the first that applies counts).
SKIP_REASONS = (
    "missing_codes",  # no codes member in the sample
    "missing_json",  # no metadata member (and no --language default for audio)
    "bad_json",  # metadata is not a JSON object
    "unknown_language",  # language missing or not in token_layout.LANGUAGES
    "bad_npy",  # codes member is not a readable .npy (or holds objects)
    "codes_dtype",  # codes are not integers
    "codes_shape",  # codes are not 1-D
    "codes_empty",  # no codes
    "codes_range",  # a code outside 0..65535
    "empty_text",  # tts: transcript missing or blank
    "bad_text",  # tts: transcript tokenizes to something the layout refuses
    "too_long",  # tts: transcript + codes do not fit the sequence length (dropped, not split)
)


class SpeechDataError(RuntimeError):
    """A build cannot start or finish (bad model dir, settings conflict, shards not done)."""


@dataclass(frozen=True)
class Schema:
    """Where a sample keeps its fields: tar member extensions and JSON field names."""

    codes_key: str = "codes.npy"
    meta_key: str = "json"
    text_field: str = "text"
    language_field: str = "language"
    duration_field: str = "duration"


@dataclass(frozen=True)
class Settings:
    """Everything that decides the output bytes. Tasks of one build must agree on all of it."""

    kind: Kind
    seq_length: int = 2048
    valid_fraction: float = 0.01
    schema: Schema = field(default_factory=Schema)
    default_language: str | None = None
    layout_hash: str = ""
    tokenizer_sha256: str | None = None  # tts only: the transcript ids depend on it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def fingerprint(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- model dir ---------------------------------------------------------------------------------
def load_model_dir(model_dir: str | Path, need_tokenizer: bool) -> tuple[TokenLayout, Any, str | None]:
    """(layout, `text_tokenizer` or None, sha256 of tokenizer.json or None) of an expanded model dir.

    Refuses a directory without a valid token_layout.json: every dataset must record the layout
    its ids were made with.
    """
    model_dir = Path(model_dir)
    try:
        layout = TokenLayout.load(model_dir)
    except FileNotFoundError:
        raise SpeechDataError(
            f"{model_dir} has no {tl.LAYOUT_FILE}: pass a model directory expanded with "
            "conversion/expand_vocab (it writes the token layout next to the tokenizer)"
        ) from None
    except (tl.LayoutMismatchError, ValueError) as e:
        raise SpeechDataError(f"{model_dir}: token layout refused: {e}") from None
    if not need_tokenizer:
        return layout, None, None
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise SpeechDataError(f"{model_dir} has no tokenizer.json (needed for tts transcripts)")
    try:
        layout.check_tokenizer(model_dir)
    except ValueError as e:
        raise SpeechDataError(f"{model_dir}: tokenizer does not match the token layout: {e}") from None
    data = tok_file.read_bytes()
    return layout, text_tokenizer(json.loads(data)), hashlib.sha256(data).hexdigest()


def text_tokenizer(tokenizer_json: dict[str, Any]) -> Any:
    """The tokenizer of every text we encode (transcripts, text corpora, synthesis prompts), from an
    expanded tokenizer.json: it gives the original Llama-3 tokenizer's ids for any string.

    Text is text whatever token names it spells out: the codec tokens (non-special added tokens,
    which would match a literal "<|s_123|>") are left out, and every special is encoded as text (a
    literal "<|end_of_text|>" must not end a document). Ids 0..128255 are the original's with some
    reserved names changed, and no special name matches, so "<|speech_start|>" gives the same BPE
    pieces as in the original, which had a reserved name at that id. Also faster to encode.
    """
    from tokenizers import Tokenizer

    tokenizer_json = {**tokenizer_json, "added_tokens": [e for e in tokenizer_json.get("added_tokens", [])
                                                         if e["id"] < tl.TEXT_VOCAB_SIZE]}
    tok = Tokenizer.from_str(json.dumps(tokenizer_json))
    tok.encode_special_tokens = True
    return tok


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Texts -> Llama-3 text ids (add_special_tokens=False) with a `text_tokenizer`, one batched call
    (encode_batch_fast: no offsets, which we do not use)."""
    if not texts:
        return []
    return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


# --- sample decoding ---------------------------------------------------------------------------
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|=][a-zA-Z]\d*)', 'fortran_order': (True|False), 'shape': \(([0-9, ]*)\), *\}")
_DTYPES: dict[bytes, np.dtype] = {}


def parse_npy(data: bytes) -> np.ndarray:
    """A .npy file's array, read in place from bytes (no copy). The header is matched with a
    regex instead of np.load's literal_eval, which costs more than the rest of a sample; an
    unusual header falls back to numpy's own reader. ValueError if it is not a plain array."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy file")
    if data[6] == 1:
        start, hlen = 10, int.from_bytes(data[8:10], "little")
    else:
        start, hlen = 12, int.from_bytes(data[8:12], "little")
    m = _NPY_HEADER.match(data, start, start + hlen)
    if m is None:
        import io

        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    descr, fortran, shape_s = m.groups()
    dtype = _DTYPES.get(descr)
    if dtype is None:
        dtype = _DTYPES[descr] = np.dtype(descr.decode())
    if dtype.hasobject:
        raise ValueError("object arrays are not codes")
    if shape_s[-1:] == b"," and shape_s.count(b",") == 1:  # 1-D, the usual case
        return np.frombuffer(data, dtype, int(shape_s[:-1]), start + hlen)
    shape = tuple(int(x) for x in shape_s.split(b",") if x.strip())
    count = int(np.prod(shape)) if shape else 1
    arr = np.frombuffer(data, dtype, count=count, offset=start + hlen)
    return arr.reshape(shape, order="F" if fortran == b"True" else "C")


_UNSIGNED: dict[np.dtype, np.dtype] = {}


def codes_problem(arr: np.ndarray) -> str | None:
    """The skip reason for an array that is not a valid code sequence, or None."""
    if arr.dtype.kind not in "iu":
        return "codes_dtype"
    if arr.ndim != 1:
        return "codes_shape"
    if arr.size == 0:
        return "codes_empty"
    if arr.dtype.kind == "i" or arr.dtype.itemsize > 2:
        # one pass: seen as unsigned, a negative code is huge, so max() catches both ends
        u = _UNSIGNED.get(arr.dtype)
        if u is None:
            u = _UNSIGNED[arr.dtype] = np.dtype(arr.dtype.str[0] + "u" + str(arr.dtype.itemsize))
        if int(arr.view(u).max()) >= tl.CODEC_SIZE:
            return "codes_range"
    return None


def is_valid_key(key: str, fraction: float) -> bool:
    """Held-out validation sample? A hash of the key: stable across reruns and task counts, and
    every piece of a split segment lands on the same side."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h < fraction * 2.0**64


def prefix_name(kind: str, language: str, split: str) -> str:
    return f"{kind}_{language}_{split}"


# --- one shard ---------------------------------------------------------------------------------
def _new_ds_stats() -> dict[str, Any]:
    return {
        "skips": {},
        "split_samples": 0,
        "declared_seconds": 0.0,
        **{s: {"samples": 0, "documents": 0, "tokens": 0, "codes": 0} for s in SPLITS},
    }


class _ShardWriter:
    """Writes the documents of one shard into per-prefix builders in a temporary directory."""

    def __init__(self, tmp: Path, kind: str):
        self.tmp, self.kind = tmp, kind
        self.builders: dict[str, IndexedDatasetBuilder] = {}
        self.datasets: dict[str, dict[str, Any]] = {}
        self.skips: Counter[str] = Counter()
        self.samples_read = 0

    def ds(self, language: str) -> dict[str, Any]:
        name = f"{self.kind}_{language}"
        d = self.datasets.get(name)
        if d is None:
            d = self.datasets[name] = _new_ds_stats()
        return d

    def skip(self, reason: str, language: str | None) -> None:
        self.skips[reason] += 1
        if language is not None:
            s = self.ds(language)["skips"]
            s[reason] = s.get(reason, 0) + 1

    def write(self, language: str, split: str, flat: np.ndarray, lengths: list[int], counts: list) -> None:
        """Append documents (concatenated in `flat`, one length each) to a prefix.

        Same bytes as one `add_document(doc, [len(doc)])` per document, in one write: per-document
        calls cost more than everything else a sample needs (see docs/data_prep.md).
        """
        name = prefix_name(self.kind, language, split)
        b = self.builders.get(name)
        if b is None:
            b = self.builders[name] = IndexedDatasetBuilder(str(self.tmp / f"{name}.bin"), dtype=DTYPE)
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

    def finalize(self) -> list[str]:
        for name, b in self.builders.items():
            b.finalize(str(self.tmp / f"{name}.idx"))
        return sorted(self.builders)


@dataclass(slots=True)
class _Pending:
    key: str
    language: str
    split: str
    codes: np.ndarray
    text: str
    duration: float  # declared in the JSON (0 if none): summed as declared_hours of what is written


class ShardProcessor:
    """Turns shards into partial datasets; holds what every shard needs (layout, tokenizer)."""

    def __init__(self, settings: Settings, layout: TokenLayout, tokenizer: Any = None, client_factory=None):
        self.settings, self.layout, self.tokenizer = settings, layout, tokenizer
        self.client_factory = client_factory or s3.make_client
        self._client = None
        sch = settings.schema
        self._codes_key, self._meta_key = sch.codes_key.lower(), sch.meta_key.lower()
        self._audio_cap = layout.max_codes_per_audio_document(settings.seq_length)
        self._frames: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._tts_frames: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def client(self):
        if self._client is None:
            self._client = self.client_factory()
        return self._client

    def _parse(self, w: _ShardWriter, key: str, fields: dict[str, bytes]) -> _Pending | None:
        """Validate one sample; count and return None if it is bad."""
        st = self.settings
        sch = st.schema
        codes_raw = fields.get(self._codes_key)
        meta_raw = fields.get(self._meta_key)
        meta: Any = {}
        language = st.default_language
        if codes_raw is None:
            return w.skip("missing_codes", None)
        if meta_raw is None:
            if st.kind == "tts" or language is None:
                return w.skip("missing_json", None)
        else:
            try:
                meta = json.loads(meta_raw)
            except (ValueError, UnicodeDecodeError):
                meta = None
            if not isinstance(meta, dict):
                return w.skip("bad_json", None)
            language = meta.get(sch.language_field, language)
        if not isinstance(language, str) or language.strip().lower() not in tl.LANGUAGES:
            return w.skip("unknown_language", None)
        language = language.strip().lower()
        try:
            codes = parse_npy(codes_raw)
        except ValueError:
            return w.skip("bad_npy", language)
        problem = codes_problem(codes)
        if problem:
            return w.skip(problem, language)
        text = ""
        if st.kind == "tts":
            text = meta.get(sch.text_field)
            if not isinstance(text, str) or not text.strip():
                return w.skip("empty_text", language)
            text = text.strip()
        duration = meta.get(sch.duration_field)
        if not isinstance(duration, (int, float)) or isinstance(duration, bool):
            duration = 0.0
        split = "valid" if is_valid_key(key, st.valid_fraction) else "train"
        return _Pending(key, language, split, codes, text, float(duration))

    def _audio_frame(self, language: str) -> tuple[np.ndarray, np.ndarray]:
        """The tokens of an audio document before and after its codes, taken from the layout."""
        frame = self._frames.get(language)
        if frame is None:
            doc = self.layout.audio_document(np.zeros(1, np.int64), language)
            at = np.flatnonzero(tl.is_speech(doc))
            assert len(at) == 1, "audio document is not head + codes + tail"
            frame = self._frames[language] = (doc[: at[0]], doc[at[0] + 1 :])
        return frame

    def _emit_audio(self, w: _ShardWriter, batch: list[_Pending]) -> None:
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

    def _emit_tts(self, w: _ShardWriter, batch: list[_Pending]) -> None:
        """TTS documents of a batch: one tokenizer call; pairs that do not fit are dropped."""
        layout, seq = self.layout, self.settings.seq_length
        keep: list[tuple[_Pending, np.ndarray]] = []
        for p, ids in zip(batch, encode_texts(self.tokenizer, [p.text for p in batch])):
            if not ids:
                w.skip("empty_text", p.language)
            elif len(p.codes) > layout.max_codes_per_tts_document(seq, len(ids)):
                w.skip("too_long", p.language)
            else:
                keep.append((p, np.array(ids, np.int32)))
        for i in range(0, len(keep), _AUDIO_BATCH):  # small chunks: see _AUDIO_BATCH
            self._write_tts(w, keep[i : i + _AUDIO_BATCH])

    def _write_tts(self, w: _ShardWriter, items: list[tuple[_Pending, np.ndarray]]) -> None:
        """Like _emit_audio: the layout checks all transcripts' ids and converts all codes in one
        call each, the frame comes from the layout, and the first document is checked against
        `layout.tts_document`."""
        layout = self.layout
        if not items:
            return
        try:  # tts_prompt refuses any id that is not a plain text token
            layout.tts_prompt(np.concatenate([ids for _, ids in items]), items[0][0].language)
        except ValueError:  # find the culprits one by one
            good = []
            for p, ids in items:
                try:
                    layout.tts_prompt(ids, p.language)
                    good.append((p, ids))
                except ValueError:
                    w.skip("bad_text", p.language)
            items = good
            if not items:
                return
        code_ids = tl.codes_to_ids(np.concatenate([p.codes for p, _ in items]))
        groups: dict[tuple[str, str], tuple[list[Any], list[int], list]] = {}
        o = 0
        for p, ids in items:
            head, start, tail = self._tts_frame(p.language)
            parts, lengths, counts = groups.setdefault((p.language, p.split), ([], [], [0, 0, 0.0]))
            n = len(p.codes)
            parts += (head, ids, start, code_ids[o : o + n], tail)
            lengths.append(len(head) + len(ids) + 1 + n + len(tail))
            o += n
            counts[0] += 1
            counts[1] += n
            counts[2] += p.duration
        p0, ids0 = items[0]
        first = np.concatenate(groups[(p0.language, p0.split)][0][:5])
        if not np.array_equal(first, layout.tts_document(ids0, p0.codes, p0.language)):
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
        batch: list[_Pending] = []
        emit = self._emit_tts if self.settings.kind == "tts" else self._emit_audio
        batch_size = _TTS_BATCH if self.settings.kind == "tts" else _AUDIO_BATCH
        parse = self._parse
        try:
            with open_shard(url, self.client if url.startswith("s3://") else None) as f:
                for key, fields in iter_samples(f):
                    w.samples_read += 1
                    p = parse(w, key, fields)
                    if p is not None:
                        batch.append(p)
                        if len(batch) >= batch_size:
                            emit(w, batch)
                            batch = []
        except (CorruptShardError, gzip.BadGzipFile, EOFError, zlib.error, UnicodeDecodeError) as e:
            error = f"corrupt: {e}"
        except FileNotFoundError as e:
            error = f"missing: {e}"
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code") if hasattr(e, "response") else None
            if code not in ("NoSuchKey", "404", "NoSuchBucket"):
                raise
            error = f"missing: {url} ({code})"
        if batch:  # samples completed before a corruption are kept
            emit(w, batch)
        prefixes = w.finalize()
        return {
            "shard": url,
            "settings": self.settings.fingerprint,
            "error": error,
            "samples_read": w.samples_read,
            "skips": dict(sorted(w.skips.items())),
            "prefixes": prefixes,
            "datasets": {k: w.datasets[k] for k in sorted(w.datasets)},
        }


# --- files -------------------------------------------------------------------------------------
def shard_id(url: str) -> str:
    """A directory name for a shard: readable tail + hash of the full URL (names may repeat)."""
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", url.rsplit("/", 1)[-1])[-60:]
    return f"{tail}-{hashlib.sha1(url.encode()).hexdigest()[:12]}"


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_done(output: Path, url: str, fingerprint: str | None = None) -> dict[str, Any] | None:
    """The done record of a shard, or None if it is not (validly) finished."""
    path = output / PARTIALS / shard_id(url) / DONE_FILE
    try:
        rec = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if rec.get("shard") != url or (fingerprint is not None and rec.get("settings") != fingerprint):
        return None
    return rec


def _check_build_file(output: Path, record: dict[str, Any]) -> None:
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
    _write_json_atomic(path, record)


def task_shards(shards: list[str], num_tasks: int, task_index: int) -> list[str]:
    """This task's shards: round-robin over the sorted list (shards of similar size spread evenly)."""
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise SpeechDataError(f"task index {task_index} is not in 0..{num_tasks - 1}")
    return sorted(shards)[task_index::num_tasks]


class _Progress:
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
    output = Path(output)
    (output / PARTIALS).mkdir(parents=True, exist_ok=True)
    _check_build_file(
        output,
        {
            "version": MANIFEST_VERSION,
            "inputs": [inputs] if isinstance(inputs, str) else list(inputs),
            "model": str(model_dir),
            "layout_hash": layout.layout_hash,
            "layout": layout.to_dict(),
            "settings": settings.to_dict(),
            "shards": shards,
        },
    )
    mine = task_shards(shards, num_tasks, task_index)
    proc = ShardProcessor(settings, layout, tokenizer, client_factory)
    label = f"[task {task_index}/{num_tasks}] " if num_tasks > 1 else ""
    prog = _Progress(len(mine), label, progress)
    failed: list[tuple[str, str]] = []
    for url in mine:
        if read_done(output, url, settings.fingerprint) is not None:
            prog.update(skipped=True)
            continue
        try:
            rec = _process_atomic(proc, output, url)
        except Exception as e:  # not a data problem: keep going, report, leave it not done
            log.error("shard %s failed: %s", url, e)
            failed.append((url, f"{type(e).__name__}: {e}"))
            prog.update()
            continue
        tokens = sum(d[s]["tokens"] for d in rec["datasets"].values() for s in SPLITS)
        prog.update(rec["samples_read"], tokens)
    return {"shards": len(shards), "task_shards": len(mine), "failed": failed, "settings": settings}


def _process_atomic(proc: ShardProcessor, output: Path, url: str) -> dict[str, Any]:
    """Process into a temporary directory, write the marker, then rename into place: a shard
    directory exists only when complete, whatever moment the process dies at."""
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


# --- merge -------------------------------------------------------------------------------------
def _add_counts(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict):
            _add_counts(dst.setdefault(k, {}), v)
        else:
            dst[k] = dst.get(k, 0) + v


def merge(output: str | Path, progress: bool = True) -> dict[str, Any]:
    """Combine every shard's partials into the final prefixes and write manifest.json.

    Partials are appended with IndexedDatasetBuilder.add_index in sorted shard order; each final
    file is written under a temporary name and renamed. Refuses while any shard is not done.
    """
    output = Path(output)
    build_path = output / BUILD_FILE
    if not build_path.is_file():
        raise SpeechDataError(f"{output} has no {BUILD_FILE}: run build_speech.py first")
    build = json.loads(build_path.read_text())
    settings = build["settings"]
    fingerprint = Settings(**{**settings, "schema": Schema(**settings["schema"])}).fingerprint
    shards = sorted(build["shards"])
    records, missing = [], []
    for url in shards:
        rec = read_done(output, url, fingerprint)
        (missing.append(url) if rec is None else records.append(rec))
    if missing:
        raise SpeechDataError(
            f"{len(missing)} of {len(shards)} shards are not done (first: {missing[0]}); "
            "run the remaining tasks (or rerun the failed ones) before merging"
        )
    # add_index calls gc.collect() once per partial; with megatron-core imported that walks
    # ~500k objects (~0.25 s). Freezing them (they live for the whole run) makes it ~free.
    gc.freeze()
    datasets: dict[str, dict[str, Any]] = {}
    skips: dict[str, int] = {}
    bad_shards = []
    by_prefix: dict[str, list[Path]] = {}
    samples_read = 0
    for rec in records:
        samples_read += rec["samples_read"]
        _add_counts(skips, rec["skips"])
        for name, d in rec["datasets"].items():
            _add_counts(datasets.setdefault(name, {}), d)
        for p in rec["prefixes"]:
            by_prefix.setdefault(p, []).append(output / PARTIALS / shard_id(rec["shard"]) / p)
        if rec["error"]:
            bad_shards.append({"shard": rec["shard"], "error": rec["error"], "samples_read": rec["samples_read"]})
    t0 = time.monotonic()
    for name in sorted(by_prefix):
        tmp_bin, tmp_idx = output / f".{name}.tmp.bin", output / f".{name}.tmp.idx"
        b = IndexedDatasetBuilder(str(tmp_bin), dtype=DTYPE)
        for part in by_prefix[name]:
            b.add_index(str(part))
        b.finalize(str(tmp_idx))
        os.replace(tmp_bin, output / f"{name}.bin")
        os.replace(tmp_idx, output / f"{name}.idx")
    if progress:
        print(f"merged {len(records)} shards into {len(by_prefix)} prefixes in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    manifest = _manifest(build, datasets, skips, bad_shards, samples_read, set(by_prefix))
    _write_json_atomic(output / MANIFEST_FILE, manifest)
    return manifest


def _manifest(build, datasets, skips, bad_shards, samples_read, written: set[str]) -> dict[str, Any]:
    kind = build["settings"]["kind"]
    out: dict[str, Any] = {}
    for name in sorted(datasets):
        d = datasets[name]
        language = name.split("_", 1)[1]
        entry: dict[str, Any] = {"kind": kind, "language": language}
        for split in SPLITS:
            sp = d.get(split, {})
            pname = prefix_name(kind, language, split)
            entry[split] = {
                "prefix": pname if pname in written else None,  # relative to the manifest
                "samples": sp.get("samples", 0),
                "documents": sp.get("documents", 0),
                "tokens": sp.get("tokens", 0),
                "codes": sp.get("codes", 0),
                "hours": round(sp.get("codes", 0) / tl.CODES_PER_SECOND / 3600, 6),
            }
        entry["split_samples"] = d.get("split_samples", 0)
        entry["declared_hours"] = round(d.get("declared_seconds", 0.0) / 3600, 6)
        entry["skips"] = dict(sorted(d.get("skips", {}).items()))
        out[name] = entry
    totals = {k: sum(e[s][k] for e in out.values() for s in SPLITS) for k in ("samples", "documents", "tokens", "codes")}
    totals["hours"] = round(totals["codes"] / tl.CODES_PER_SECOND / 3600, 6)
    return {
        "version": MANIFEST_VERSION,
        "kind": kind,
        "layout_hash": build["layout_hash"],
        "layout": build["layout"],
        "settings": build["settings"],
        "inputs": build["inputs"],
        "shards": {"total": len(build["shards"]), "bad": bad_shards},
        "samples_read": samples_read,
        "totals": totals,
        "skips": dict(sorted(skips.items())),
        "datasets": out,
    }


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

