"""Build Megatron indexed datasets of text-only documents from jsonl / parquet corpora.

Each input file (local or s3://, jsonl[.gz] or parquet) is read with the `datasets` library in
streaming mode. A record's text is one field (`text_field`) or a template over several fields
(Aya's prompt/response pairs: `AYA_TEMPLATE`); its language is a field (`language_field`, codes
or names, see `normalise_language`) or fixed (`default_language`). Long-form text goes through
the quality filters (`Filters`), is tokenised in batches by `speech.text_tokenizer` (the
original Llama-3 tokenizer's ids; token names in the text stay text) and written as
`layout.text_document` documents (BOS text EOD). A text longer than the sequence length is split
into near-equal consecutive pieces of its token ids, each its own BOS...EOD document of at most
seq_length tokens.

Output directory (the speech builder's machinery, `speechlm.data.speech`, reused):
  build.json, partials/<file-id>/ (one finished input file + done.json),
  <source>_<lang>_train.bin/.idx, <source>_<lang>_valid.bin/.idx, manifest.json
The unit of work is an input file; tasks split the sorted file list round-robin; a finished
file is skipped by a rerun; the merged bytes do not depend on the task count.
"""

from __future__ import annotations

import fnmatch
import gc
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from speechlm import s3
from speechlm import token_layout as tl
from speechlm.data.speech import (
    DTYPE,
    MANIFEST_FILE,
    PARTIALS,
    SPLITS,
    SpeechDataError,
    _add_counts,
    _check_build_file,
    _process_atomic,
    _Progress,
    _write_json_atomic,
    encode_texts,
    is_valid_key,
    load_model_dir,
    read_done,
    shard_id,
    task_shards,
)
from speechlm.token_layout import TokenLayout

log = logging.getLogger(__name__)

BUILD_FILE = "build.json"
MANIFEST_VERSION = 1
TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".parquet")
# Aya (CohereForAI/aya_dataset): prompt and response as one document, separated by a blank
# line and nothing else: no English role words inside Indic text, and the model learns that an
# answer follows its question.
AYA_TEMPLATE = "{inputs}\n\n{targets}"
TEMPLATES = {"aya": AYA_TEMPLATE}
_BATCH = 512  # records per tokenizer call and per write

# Reasons a record is not written, in the order they are checked (the first that applies counts).
SKIP_REASONS = (
    "unknown_language",  # no language (field missing and no --language) or not a language name
    "other_language",  # a real language, but not one of token_layout.LANGUAGES (Aya has ~70)
    "missing_text",  # the text field (or a template field) is missing or not a string
    "empty_text",  # nothing but whitespace
    "too_short",  # fewer than min_chars characters
    "low_letter_share",  # letters (incl. Indic combining marks) < min_letter_share of non-space chars
    "repeated_lines",  # share of lines repeating an earlier line > max_repeated_line_share
    "boilerplate",  # share of lines with a boilerplate phrase > max_boilerplate_line_share
    "bad_text",  # tokenises to nothing
)

# Phrases of web page chrome (cookie banners, footers, link bait); matched case-insensitively.
BOILERPLATE_PATTERNS = (
    r"cookie policy", r"use of cookies", r"we use cookies", r"accept (all )?cookies",
    r"all rights reserved", r"click here", r"privacy policy", r"terms (of use|and conditions|of service)",
    r"subscribe to our newsletter", r"sign up for our newsletter", r"enable javascript",
    r"javascript is disabled", r"copyright ©", r"© ?\d{4}", r"powered by (wordpress|blogger)",
    r"read more »", r"share on (facebook|twitter|whatsapp)", r"follow us on",
)
_BOILERPLATE_RE = re.compile("|".join(f"(?:{p})" for p in BOILERPLATE_PATTERNS), re.IGNORECASE)

# Language names and codes seen in corpora -> our codes. Aya writes English names ("Hindi") and
# ISO 639-3 codes ("hin"); FLORES-style codes are "hin_Deva"; BCP 47 "hi-IN".
_ALIASES = {
    "en": ("eng", "english"),
    "as": ("asm", "assamese"),
    "bn": ("ben", "bengali", "bangla"),
    "gu": ("guj", "gujarati"),
    "hi": ("hin", "hindi"),
    "kn": ("kan", "kannada"),
    "ml": ("mal", "malayalam"),
    "mr": ("mar", "marathi"),
    "or": ("ori", "ory", "odia", "oriya"),
    "pa": ("pan", "punjabi", "panjabi"),
    "ta": ("tam", "tamil"),
    "te": ("tel", "telugu"),
}
LANGUAGE_ALIASES = {a: code for code, names in _ALIASES.items() for a in (code, *names)}
assert set(_ALIASES) == set(tl.LANGUAGES)


class TextDataError(SpeechDataError):
    """A text build cannot start or finish (bad settings, model dir, inputs not done)."""


def normalise_language(value: Any) -> str | None:
    """Our language code for a corpus's language value, "" for another real language, None for
    no usable value. "hi", "HI", "hin", "Hindi", "hin_Deva", "hi-IN" -> "hi"."""
    if not isinstance(value, str) or not value.strip():
        return None
    v = value.strip().lower()
    head = re.split(r"[-_ ]", v, maxsplit=1)[0]
    code = LANGUAGE_ALIASES.get(v) or LANGUAGE_ALIASES.get(head)
    if code:
        return code
    return "" if re.fullmatch(r"[a-z]+", head) else None  # "French", "fra", "fra_Latn": another language


# --- filters -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Filters:
    """Quality filters for long-form text; a threshold of None (or 0 / 1) turns a rule off."""

    min_chars: int = 200
    min_letter_share: float = 0.7
    max_repeated_line_share: float = 0.3
    max_boilerplate_line_share: float = 0.2


# Filter settings per kind of corpus (build_text.py --preset; docs/mixture.md). Web text: the
# defaults above. Instruction pairs (Aya) are short by nature, and answers carry numbers, lists and
# formulas: no length or repeated-line rule and a lower letter share; page chrome is still dropped.
FILTER_PRESETS = {
    "web": Filters(),
    "instruction": Filters(min_chars=0, min_letter_share=0.5, max_repeated_line_share=None),
}


def _is_letter(ch: str) -> bool:
    # Indic vowel signs and viramas (e.g. "ि", "்") are combining marks (Mn/Mc), not alphabetic
    # to str.isalpha, yet they are part of words: count them as letters.
    return ch.isalpha() or unicodedata.category(ch) in ("Mn", "Mc")


_SPACE, _LETTER, _OTHER = 0, 1, 2
_CLASS_TABLE: np.ndarray | None = None


def _class_table() -> np.ndarray:
    """Class of every Basic Multilingual Plane code point (built once, ~0.1 s): a table lookup
    over the text's code points is ~50x faster than a Python loop over its characters."""
    global _CLASS_TABLE
    if _CLASS_TABLE is None:
        chars = [chr(i) for i in range(0x10000)]
        _CLASS_TABLE = np.array([_SPACE if c.isspace() else _LETTER if _is_letter(c) else _OTHER for c in chars], np.uint8)
    return _CLASS_TABLE


def letter_share(text: str) -> float:
    """Letters (str.isalpha or a combining mark) / non-whitespace characters; 0 for none."""
    cps = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    bmp = cps < 0x10000
    counts = np.bincount(_class_table()[cps[bmp]], minlength=3)
    letters, other = int(counts[_LETTER]), int(counts[_OTHER])
    if not bmp.all():  # outside the BMP (emoji, rare scripts): classify one by one
        for cp in cps[~bmp]:
            ch = chr(int(cp))
            if not ch.isspace():
                letters, other = letters + _is_letter(ch), other + (not _is_letter(ch))
    total = letters + other
    return letters / total if total else 0.0


def _lines(text: str) -> list[str]:
    return [s for s in (line.strip() for line in text.splitlines()) if s]


def repeated_line_share(text: str) -> float:
    """Share of the non-blank lines that repeat an earlier line (0 for none)."""
    lines = _lines(text)
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


# Literal pieces, one of which every boilerplate pattern contains (lower case): a text with
# none of them (most texts) is decided by a few substring scans instead of a regex per line.
_BOILERPLATE_ANCHORS = ("cookie", "rights reserved", "click here", "privacy", "terms ", "newsletter", "javascript",
                        "©", "powered by", "read more", "share on", "follow us")


def boilerplate_line_share(text: str) -> float:
    """Share of the non-blank lines containing a boilerplate phrase (BOILERPLATE_PATTERNS)."""
    low = text.lower()
    if not any(a in low for a in _BOILERPLATE_ANCHORS):
        return 0.0
    lines = _lines(text)
    return sum(1 for s in lines if _BOILERPLATE_RE.search(s)) / len(lines) if lines else 0.0


def filter_reason(text: str, f: Filters) -> str | None:
    """The first filter rule the text fails, or None if it passes."""
    if not text.strip():
        return "empty_text"
    if f.min_chars and len(text) < f.min_chars:
        return "too_short"
    if f.min_letter_share and letter_share(text) < f.min_letter_share:
        return "low_letter_share"
    if f.max_repeated_line_share is not None and f.max_repeated_line_share < 1 and repeated_line_share(text) > f.max_repeated_line_share:
        return "repeated_lines"
    if f.max_boilerplate_line_share is not None and f.max_boilerplate_line_share < 1 and boilerplate_line_share(text) > f.max_boilerplate_line_share:
        return "boilerplate"
    return None


# --- settings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """Everything that decides the output bytes. Tasks of one build must agree on all of it."""

    source: str
    seq_length: int = 2048
    valid_fraction: float = 0.01
    text_field: str = "text"
    template: str | None = None  # e.g. AYA_TEMPLATE; replaces text_field
    language_field: str | None = "language"
    default_language: str | None = None
    input_format: str | None = None  # json | parquet; None: from the file name
    filters: Filters = field(default_factory=Filters)
    layout_hash: str = ""
    tokenizer_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def fingerprint(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def template_fields(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.template) if self.template else [self.text_field]


def prefix_name(source: str, language: str, split: str) -> str:
    return f"{source}_{language}_{split}"


def split_ids(ids: np.ndarray, max_ids: int) -> list[np.ndarray]:
    """Near-equal consecutive pieces of at most max_ids ids (one piece if it fits). Near-equal
    rather than greedy so no tiny tail piece is made; the pieces concatenate back to `ids`."""
    n_pieces = max(1, -(-len(ids) // max_ids))
    return np.array_split(ids, n_pieces) if n_pieces > 1 else [ids]


# --- inputs ------------------------------------------------------------------------------------
def _is_text_file(name: str) -> bool:
    return name.endswith(TEXT_SUFFIXES)


def expand_inputs(specs: str | list[str], client_factory=None) -> list[str]:
    """Input files named by specs (local paths, directories, globs, s3://bucket/key, s3 prefixes
    ending in / or s3 globs; brace ranges expanded), sorted and de-duplicated. Like
    `shards.expand_spec`, but for jsonl/parquet files."""
    from braceexpand import braceexpand

    specs = [specs] if isinstance(specs, str) else list(specs)
    out: set[str] = set()
    client = None
    for spec in specs:
        for item in braceexpand(spec):
            if item.startswith("s3://"):
                client = client or (client_factory or s3.make_client)()
                bucket, key = s3.split_url(item)
                if any(c in key for c in "*?["):
                    static = re.split(r"[*?\[]", key, maxsplit=1)[0]
                    out.update(f"s3://{bucket}/{k}" for k in s3.list_keys(client, bucket, static) if fnmatch.fnmatchcase(k, key))
                elif key == "" or key.endswith("/"):
                    out.update(f"s3://{bucket}/{k}" for k in s3.list_keys(client, bucket, key) if _is_text_file(k))
                else:
                    out.add(item)
            elif any(c in item for c in "*?["):
                out.update(p for p in glob.glob(item) if os.path.isfile(p))
            elif os.path.isdir(item):
                out.update(os.path.join(d, f) for d, _, fs in os.walk(item) for f in fs if _is_text_file(f))
            else:
                out.add(item)
    if not out:
        raise TextDataError(f"no input files found for {specs}")
    return sorted(out)


def _format_of(url: str, forced: str | None) -> str:
    if forced:
        return forced
    return "parquet" if url.endswith(".parquet") else "json"


def _local_copy(client, url: str, tmp: Path) -> Path:
    """Stream an S3 object to a local file through s3.ResumableBody (resumes broken transfers).

    Why a copy: the s3fs this environment pins (0.4.2) predates the fsspec that `datasets` uses,
    so `datasets` cannot read s3:// itself; and parquet needs random access to its footer."""
    bucket, key = s3.split_url(url)
    suffix = next((s for s in sorted(TEXT_SUFFIXES, key=len, reverse=True) if key.endswith(s)), "")
    dst = tmp / f"input{suffix}"
    with s3.ResumableBody(client, bucket, key) as src, open(dst, "wb") as out:
        shutil.copyfileobj(src, out, 8 << 20)
    return dst


def iter_records(path: str | Path, fmt: str, columns: list[str], batch_size: int = _BATCH) -> Iterator[dict[str, list]]:
    """Column batches of a local jsonl/parquet file, read by `datasets` in streaming mode."""
    from datasets import load_dataset

    kw: dict[str, Any] = {"columns": columns} if fmt == "parquet" else {}
    ds = load_dataset(fmt, data_files=[str(path)], split="train", streaming=True, **kw)
    yield from ds.iter(batch_size=batch_size)


# --- one input file ----------------------------------------------------------------------------
def _new_ds_stats() -> dict[str, Any]:
    return {"skips": {}, "split_samples": 0, **{s: {"samples": 0, "documents": 0, "tokens": 0, "chars": 0} for s in SPLITS}}


class _FileWriter:
    """Writes the documents of one input file into per-prefix builders in a temporary dir."""

    def __init__(self, tmp: Path, source: str):
        self.tmp, self.source = tmp, source
        self.builders: dict[str, IndexedDatasetBuilder] = {}
        self.datasets: dict[str, dict[str, Any]] = {}
        self.skips: Counter[str] = Counter()
        self.samples_read = 0

    def ds(self, language: str) -> dict[str, Any]:
        return self.datasets.setdefault(f"{self.source}_{language}", _new_ds_stats())

    def skip(self, reason: str, language: str | None) -> None:
        self.skips[reason] += 1
        if language:
            s = self.ds(language)["skips"]
            s[reason] = s.get(reason, 0) + 1

    def write(self, language: str, split: str, docs: list[np.ndarray], chars: int) -> None:
        name = prefix_name(self.source, language, split)
        b = self.builders.get(name)
        if b is None:
            b = self.builders[name] = IndexedDatasetBuilder(str(self.tmp / f"{name}.bin"), dtype=DTYPE)
        # one add_document call per record: documents are the pieces, in order
        b.add_document(np.concatenate(docs), [len(d) for d in docs])
        st = self.ds(language)
        sp = st[split]
        sp["samples"] += 1
        sp["documents"] += len(docs)
        sp["tokens"] += sum(len(d) for d in docs)
        sp["chars"] += chars
        st["split_samples"] += len(docs) > 1

    def finalize(self) -> list[str]:
        for name, b in self.builders.items():
            b.finalize(str(self.tmp / f"{name}.idx"))
        return sorted(self.builders)


class FileProcessor:
    """Turns input files into partial datasets (the `proc` of speech._process_atomic)."""

    def __init__(self, settings: Settings, layout: TokenLayout, tokenizer: Any, client_factory=None):
        self.settings, self.layout, self.tokenizer = settings, layout, tokenizer
        self.client_factory = client_factory or s3.make_client
        self._client = None
        self.max_ids = layout.max_text_ids_per_text_document(settings.seq_length)

    @property
    def client(self):
        if self._client is None:
            self._client = self.client_factory()
        return self._client

    def render(self, row: dict[str, Any]) -> str | None:
        """The record's text (template filled in), or None when a field is missing."""
        st = self.settings
        if st.template is None:
            v = row.get(st.text_field)
            return v if isinstance(v, str) else None
        vals = {}
        for f in st.template_fields:
            v = row.get(f)
            if not isinstance(v, str):
                return None
            vals[f] = v.strip()
        return st.template.format_map(vals)

    def language(self, row: dict[str, Any]) -> str | None:
        st = self.settings
        value = row.get(st.language_field) if st.language_field else None
        if value is None or (isinstance(value, str) and not value.strip()):
            return st.default_language
        return normalise_language(value)

    def _emit(self, w: _FileWriter, batch: list[tuple[str, str]]) -> None:
        layout = self.layout
        for (lang, text), ids in zip(batch, encode_texts(self.tokenizer, [t for _, t in batch])):
            if not ids:
                w.skip("bad_text", lang)
                continue
            arr = np.asarray(ids, np.int32)
            docs = [layout.text_document(p) for p in split_ids(arr, self.max_ids)]
            # held-out by a hash of the text: duplicates of a document never straddle the split
            split = "valid" if is_valid_key(text, self.settings.valid_fraction) else "train"
            w.write(lang, split, docs, len(text))

    def process(self, url: str, tmp: Path) -> dict[str, Any]:
        """Write the partial datasets of one input file into `tmp`; return its done record.

        A corrupt or missing file is recorded (records read before the damage are kept); a
        transient S3 error that outlasts the retries propagates: the file is not marked done."""
        st = self.settings
        w = _FileWriter(tmp, st.source)
        error = None
        columns = [*st.template_fields] + ([st.language_field] if st.language_field else [])
        local: Path | None = None
        try:
            if url.startswith("s3://"):
                try:  # a transient error past the retries propagates: the file stays not done
                    local = _local_copy(self.client, url, tmp)
                except Exception as e:
                    code = getattr(e, "response", {}).get("Error", {}).get("Code") if hasattr(e, "response") else None
                    if code not in ("NoSuchKey", "404", "NoSuchBucket"):
                        raise
                    raise FileNotFoundError(f"{url} ({code})") from None
            path = local or Path(url)
            if not path.is_file():
                raise FileNotFoundError(str(path))
            fmt = _format_of(url, st.input_format)
            if fmt == "parquet":  # ask only for columns the file has (a missing one reads as None)
                import pyarrow.parquet as pq

                have = set(pq.read_schema(path).names)
                columns = [c for c in columns if c in have]
            for cols in iter_records(path, fmt, columns):
                n = len(next(iter(cols.values()))) if cols else 0
                batch: list[tuple[str, str]] = []
                for i in range(n):
                    w.samples_read += 1
                    row = {k: v[i] for k, v in cols.items()}
                    lang = self.language(row)
                    if lang is None:
                        w.skip("unknown_language", None)
                        continue
                    if lang == "":
                        w.skip("other_language", None)
                        continue
                    text = self.render(row)
                    if text is None:
                        w.skip("missing_text", lang)
                        continue
                    reason = filter_reason(text, st.filters)
                    if reason:
                        w.skip(reason, lang)
                        continue
                    batch.append((lang, text))
                self._emit(w, batch)
        except FileNotFoundError as e:
            error = f"missing: {e}"
        except Exception as e:
            if not _is_data_error(e):
                raise
            error = f"corrupt: {type(e).__name__}: {e}"
        finally:
            if local is not None:
                local.unlink(missing_ok=True)
        return {
            "shard": url,  # the key speech.read_done checks
            "settings": st.fingerprint,
            "error": error,
            "samples_read": w.samples_read,
            "skips": dict(sorted(w.skips.items())),
            "prefixes": w.finalize(),
            "datasets": {k: w.datasets[k] for k in sorted(w.datasets)},
        }


def _is_data_error(e: BaseException) -> bool:
    """Errors that mean the local file's bytes are bad: JSON/parquet/gzip decoding."""
    import gzip
    import zlib

    import pyarrow as pa
    from datasets.exceptions import DatasetGenerationError

    data_errors = (pa.ArrowException, ValueError, gzip.BadGzipFile, EOFError, zlib.error, UnicodeDecodeError,
                   DatasetGenerationError)
    return isinstance(e, data_errors)


# --- a task ------------------------------------------------------------------------------------
def run_task(
    inputs: str | list[str],
    model_dir: str | Path,
    output: str | Path,
    source: str,
    *,
    seq_length: int = 2048,
    valid_fraction: float = 0.01,
    text_field: str = "text",
    template: str | None = None,
    language_field: str | None = "language",
    default_language: str | None = None,
    input_format: str | None = None,
    filters: Filters | None = None,
    num_tasks: int = 1,
    task_index: int = 0,
    s3_settings: s3.S3Settings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Process this task's input files into partials (skipping finished ones). Returns a summary
    with `failed` (files that hit a non-data error; rerun the task for them)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", source):
        raise TextDataError(f"source {source!r}: use letters, digits, '.' and '-' (it names files and datasets)")
    if default_language is not None and default_language not in tl.LANGUAGES:
        raise TextDataError(f"unknown --language {default_language!r}; known: {', '.join(tl.LANGUAGES)}")
    if not language_field and default_language is None:
        raise TextDataError("no language: pass a language field or a fixed --language")
    if not 0 <= valid_fraction < 1:
        raise TextDataError(f"valid fraction must be in [0, 1), got {valid_fraction}")
    if input_format not in (None, "json", "parquet"):
        raise TextDataError(f"format must be json or parquet, got {input_format!r}")
    template = TEMPLATES.get(template, template) if template else None
    layout, tokenizer, tok_sha = load_model_dir(model_dir, need_tokenizer=True)
    if layout.max_text_ids_per_text_document(seq_length) < 1:
        raise TextDataError(f"seq_length {seq_length} leaves no room for text")
    settings = Settings(source, seq_length, valid_fraction, text_field, template, language_field or None,
                        default_language, input_format, filters or Filters(), layout.layout_hash, tok_sha or "")
    s3s = s3_settings or s3.S3Settings.from_env()
    client_factory = lambda: s3.make_client(s3s)  # noqa: E731
    files = expand_inputs(inputs, client_factory)  # before anything is written: none found is an error
    output = Path(output)
    (output / PARTIALS).mkdir(parents=True, exist_ok=True)
    _check_build_file(output, {
        "version": MANIFEST_VERSION, "kind": "text",
        "inputs": [inputs] if isinstance(inputs, str) else list(inputs),
        "model": str(model_dir), "layout_hash": layout.layout_hash,
        "settings": settings.to_dict(), "shards": files,
    })
    mine = task_shards(files, num_tasks, task_index)
    proc = FileProcessor(settings, layout, tokenizer, client_factory)
    prog = _Progress(len(mine), f"[task {task_index}/{num_tasks}] " if num_tasks > 1 else "", progress)
    failed: list[tuple[str, str]] = []
    for url in mine:
        if read_done(output, url, settings.fingerprint) is not None:
            prog.update(skipped=True)
            continue
        try:
            rec = _process_atomic(proc, output, url)
        except Exception as e:  # not a data problem: keep going, report, leave it not done
            log.error("input %s failed: %s", url, e)
            failed.append((url, f"{type(e).__name__}: {e}"))
            prog.update()
            continue
        prog.update(rec["samples_read"], sum(d[s]["tokens"] for d in rec["datasets"].values() for s in SPLITS))
    return {"files": len(files), "task_files": len(mine), "failed": failed, "settings": settings}


# --- merge -------------------------------------------------------------------------------------
def merge(output: str | Path, progress: bool = True) -> dict[str, Any]:
    """Combine the partials of every input file into the final prefixes and write manifest.json.
    Refuses while any input file is not done."""
    output = Path(output)
    if not (output / BUILD_FILE).is_file():
        raise TextDataError(f"{output} has no {BUILD_FILE}: run build_text.py first")
    build = json.loads((output / BUILD_FILE).read_text())
    if build.get("kind") != "text":
        raise TextDataError(f"{output} is not a text build (kind {build.get('kind')!r})")
    st = build["settings"]
    fingerprint = Settings(**{**st, "filters": Filters(**st["filters"])}).fingerprint
    files = sorted(build["shards"])
    records, missing = [], []
    for url in files:
        rec = read_done(output, url, fingerprint)
        (missing.append(url) if rec is None else records.append(rec))
    if missing:
        raise TextDataError(f"{len(missing)} of {len(files)} input files are not done (first: {missing[0]}); "
                            "run the remaining tasks (or rerun the failed ones) before merging")
    gc.freeze()  # add_index runs gc.collect() per partial; see speech.merge
    datasets: dict[str, dict[str, Any]] = {}
    skips: dict[str, int] = {}
    bad, by_prefix, samples_read = [], {}, 0
    for rec in records:
        samples_read += rec["samples_read"]
        _add_counts(skips, rec["skips"])
        for name, d in rec["datasets"].items():
            _add_counts(datasets.setdefault(name, {}), d)
        for p in rec["prefixes"]:
            by_prefix.setdefault(p, []).append(output / PARTIALS / shard_id(rec["shard"]) / p)
        if rec["error"]:
            bad.append({"file": rec["shard"], "error": rec["error"], "samples_read": rec["samples_read"]})
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
        print(f"merged {len(records)} files into {len(by_prefix)} prefixes in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    manifest = _manifest(build, datasets, skips, bad, samples_read, set(by_prefix))
    _write_json_atomic(output / MANIFEST_FILE, manifest)
    return manifest


def _manifest(build, datasets, skips, bad, samples_read, written: set[str]) -> dict[str, Any]:
    """The speech manifest's shape (see speech._manifest), with source and no hours."""
    source = build["settings"]["source"]
    out: dict[str, Any] = {}
    for name in sorted(datasets):
        d = datasets[name]
        language = name[len(source) + 1:]
        entry: dict[str, Any] = {"kind": "text", "source": source, "language": language}
        for split in SPLITS:
            sp = d.get(split, {})
            pname = prefix_name(source, language, split)
            entry[split] = {
                "prefix": pname if pname in written else None,  # relative to the manifest
                **{k: sp.get(k, 0) for k in ("samples", "documents", "tokens", "chars")},
            }
        entry["split_samples"] = d.get("split_samples", 0)
        entry["skips"] = dict(sorted(d.get("skips", {}).items()))
        out[name] = entry
    totals = {k: sum(e[s][k] for e in out.values() for s in SPLITS) for k in ("samples", "documents", "tokens", "chars")}
    return {
        "version": MANIFEST_VERSION,
        "kind": "text",
        "source": source,
        "layout_hash": build["layout_hash"],
        "settings": build["settings"],
        "inputs": build["inputs"],
        "files": {"total": len(build["shards"]), "bad": bad},
        "samples_read": samples_read,
        "totals": totals,
        "skips": dict(sorted(skips.items())),
        "datasets": out,
    }


def build(inputs: str | list[str], model_dir: str | Path, output: str | Path, source: str, *,
          merge_after: bool = True, **kw: Any) -> dict[str, Any]:
    """run_task, then merge when this task had no failures and merge_after is set."""
    summary = run_task(inputs, model_dir, output, source, **kw)
    if not summary["failed"] and merge_after:
        summary["manifest"] = merge(output, progress=kw.get("progress", True))
    return summary


def format_manifest(m: dict[str, Any]) -> str:
    """A short human summary of a text manifest."""
    lines = [f"text source {m['source']}: {m['samples_read']:,} records read, {m['files']['total']} files "
             f"({len(m['files']['bad'])} bad), layout {m['layout_hash'][:12]}"]
    for name, e in m["datasets"].items():
        tr, va = e["train"], e["valid"]
        lines.append(f"  {name}: train {tr['documents']:,} docs / {tr['tokens']:,} tokens, "
                     f"valid {va['documents']:,} docs / {va['tokens']:,} tokens, split records {e['split_samples']:,}")
    if m["skips"]:
        lines.append("  skipped: " + ", ".join(f"{k} {v:,}" for k, v in m["skips"].items()))
    return "\n".join(lines)

