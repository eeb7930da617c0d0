"""Build Megatron indexed datasets of text-only documents from jsonl / parquet corpora.

Each input file (local or s3://, jsonl[.gz] or parquet) is read with the `datasets` library in
streaming mode. A record's text is one field (`text_field`) or a template over several fields
(Aya's prompt/response pairs: `AYA_TEMPLATE`); its language is a field (`language_field`, codes
or names, see `text_filters.normalise_language`) or fixed (`default_language`). Long-form text
goes through the quality filters (`text_filters.Filters`), is tokenised in batches by
`model_dir.text_tokenizer` (the original Llama-3 tokenizer's ids; token names in the text stay
text) and written as `layout.text_document` documents (BOS text EOD). A text longer than the
sequence length is split into near-equal consecutive pieces of its token ids, each its own
BOS...EOD document of at most seq_length tokens.

Output directory (the speech builder's layout: `partials`, `merge`):
  build.json, partials/<file-id>/ (one finished input file + done.json),
  <source>_<lang>_train.bin/.idx, <source>_<lang>_valid.bin/.idx, manifest.json
The unit of work is an input file; tasks split the sorted file list round-robin; a finished
file is skipped by a rerun; the merged bytes do not depend on the task count.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from speechlm import token_layout as tl
from speechlm.data import inputs as inputs_mod
from speechlm.data import merge as merge_mod
from speechlm.data import s3
from speechlm.data.model_dir import encode_texts, load_model_dir
from speechlm.data.partials import BuildSettings, PartialWriter, SpeechDataError, is_valid_key, run_partials
from speechlm.data.text_filters import Filters, filter_reason, normalise_language
from speechlm.token_layout import TokenLayout

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


class TextDataError(SpeechDataError):
    """A text build cannot start or finish (bad settings, model dir, inputs not done)."""


# --- settings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings(BuildSettings):
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

    @property
    def template_fields(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.template) if self.template else [self.text_field]


def split_ids(ids: np.ndarray, max_ids: int) -> list[np.ndarray]:
    """Near-equal consecutive pieces of at most max_ids ids (one piece if it fits). Near-equal
    rather than greedy so no tiny tail piece is made; the pieces concatenate back to `ids`."""
    n_pieces = max(1, -(-len(ids) // max_ids))
    return np.array_split(ids, n_pieces) if n_pieces > 1 else [ids]


# --- inputs ------------------------------------------------------------------------------------
def expand_inputs(specs: str | list[str], client_factory=None) -> list[str]:
    """Input files named by specs (local paths, directories, globs, s3://bucket/key, s3 prefixes
    ending in / or s3 globs; brace ranges expanded), sorted and de-duplicated: `inputs.expand`
    for jsonl/parquet files."""
    out = inputs_mod.expand(specs, TEXT_SUFFIXES, client_factory)
    if not out:
        raise TextDataError(f"no input files found for {[specs] if isinstance(specs, str) else list(specs)}")
    return out


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
COUNTS = ("samples", "documents", "tokens", "chars")  # per split of a dataset


class _FileWriter(PartialWriter):
    """The partials of one input file, one record (its pieces) at a time."""

    COUNTS = COUNTS

    def write(self, language: str, split: str, docs: list[np.ndarray], chars: int) -> None:
        # one add_document call per record: documents are the pieces, in order
        self.builder(language, split).add_document(np.concatenate(docs), [len(d) for d in docs])
        st = self.ds(language)
        sp = st[split]
        sp["samples"] += 1
        sp["documents"] += len(docs)
        sp["tokens"] += sum(len(d) for d in docs)
        sp["chars"] += chars
        st["split_samples"] += len(docs) > 1


class FileProcessor:
    """Turns input files into partial datasets (the `proc` of partials.process_atomic)."""

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
                    code = inputs_mod.missing_object_code(e)
                    if code is None:
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
        return w.record(url, st.fingerprint, error)


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
    build_record = {
        "version": merge_mod.MANIFEST_VERSION, "kind": "text",
        "inputs": [inputs] if isinstance(inputs, str) else list(inputs),
        "model": str(model_dir), "layout_hash": layout.layout_hash,
        "settings": settings.to_dict(), "shards": files,
    }
    proc = FileProcessor(settings, layout, tokenizer, client_factory)
    mine, failed = run_partials(proc, Path(output), build_record, settings.fingerprint, num_tasks=num_tasks,
                                task_index=task_index, progress=progress, unit="input")
    return {"files": len(files), "task_files": len(mine), "failed": failed, "settings": settings}


# --- merge -------------------------------------------------------------------------------------
def _check_text_build(output: Path, build: dict[str, Any]) -> None:
    if build.get("kind") != "text":
        raise TextDataError(f"{output} is not a text build (kind {build.get('kind')!r})")


def _fingerprint(st: dict[str, Any]) -> str:
    return Settings(**{**st, "filters": Filters(**st["filters"])}).fingerprint


def _manifest(m: merge_mod.Merged) -> dict[str, Any]:
    """The shared manifest (`merge.manifest`) with the source and no hours."""
    source = m.build["settings"]["source"]
    return merge_mod.manifest(m, kind="text", stem=source, counts=COUNTS, inputs_key="files",
                              identity={"source": source})


_MERGE = merge_mod.Spec(tool="build_text.py", error=TextDataError, unit="file", inputs="input files",
                        fingerprint=_fingerprint, manifest=_manifest, check=_check_text_build)


def merge(output: str | Path, progress: bool = True) -> dict[str, Any]:
    """Combine the partials of every input file into the final prefixes and write manifest.json
    (`merge.merge`). Refuses while any input file is not done."""
    return merge_mod.merge(output, _MERGE, progress)


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

