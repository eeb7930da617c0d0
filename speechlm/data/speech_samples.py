"""Decode and validate one WebDataset sample of a speech build: its codes (.npy) and metadata
(JSON: language, transcript, duration), with the reason a sample is not written."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np

from speechlm import token_layout as tl
from speechlm.data.partials import is_valid_key

Kind = Literal["audio", "tts"]

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


@dataclass(frozen=True)
class Schema:
    """Where a sample keeps its fields: tar member extensions and JSON field names."""

    codes_key: str = "codes.npy"
    meta_key: str = "json"
    text_field: str = "text"
    language_field: str = "language"
    duration_field: str = "duration"


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
_json_decode = json.JSONDecoder().decode  # what json.loads uses for a str with default arguments


try:  # 5x the standard library's speed on a sample's metadata (docs/performance.md)
    from orjson import loads as _orjson_loads
except ImportError:  # optional: the standard library gives the same values
    _orjson_loads = None


def parse_json(data: bytes) -> Any:
    """json.loads(data), faster: orjson where it parses the bytes (strict RFC 8259 UTF-8), else the
    standard library, which also takes what orjson refuses (NaN, lone surrogates, a BOM, UTF-16).
    Where both parse, they agree on every value a sample's fields use (orjson reads integers beyond
    64 bits as floats; only `duration` is numeric, and it becomes a float either way)."""
    if _orjson_loads is not None:
        try:
            return _orjson_loads(data)
        except ValueError:  # orjson.JSONDecodeError is a ValueError
            pass
    if data[:1] == b"{" and data[1:2] != b"\0":  # skip json.loads' encoding detection where it would say utf-8
        return _json_decode(data.decode("utf-8", "surrogatepass"))
    return json.loads(data)


def codes_structure_problem(arr: np.ndarray) -> str | None:
    """codes_problem without the range check, which a build does once per batch (`codes_in_range`)."""
    if arr.dtype.kind not in "iu":
        return "codes_dtype"
    if arr.ndim != 1:
        return "codes_shape"
    if arr.size == 0:
        return "codes_empty"
    return None


def codes_problem(arr: np.ndarray) -> str | None:
    """The skip reason for an array that is not a valid code sequence, or None."""
    problem = codes_structure_problem(arr)
    if problem:
        return problem
    if arr.dtype.kind == "i" or arr.dtype.itemsize > 2:
        # one pass: seen as unsigned, a negative code is huge, so max() catches both ends
        u = _UNSIGNED.get(arr.dtype)
        if u is None:
            u = _UNSIGNED[arr.dtype] = np.dtype(arr.dtype.str[0] + "u" + str(arr.dtype.itemsize))
        if int(arr.view(u).max()) >= tl.CODEC_SIZE:
            return "codes_range"
    return None


def codes_in_range(batch: list["Sample"], skip: Callable[[str, str | None], None], chunk: int = 32) -> list["Sample"]:
    """The samples of a batch whose codes are all in 0..65535; `skip("codes_range", language)` for
    the others. One range check per `chunk` samples instead of one per sample (a numpy call costs
    more than its 500 codes); a chunk that fails is checked sample by sample."""
    keep: list[Sample] = []
    for i in range(0, len(batch), chunk):
        part = batch[i : i + chunk]
        dtype = part[0].codes.dtype
        if all(p.codes.dtype == dtype for p in part) and codes_problem(np.concatenate([p.codes for p in part])) is None:
            keep += part
            continue
        for p in part:
            if codes_problem(p.codes):
                skip("codes_range", p.language)
            else:
                keep.append(p)
    return keep


@dataclass(slots=True)
class Sample:
    """A sample that passed decoding, waiting for its batch (whose codes' range is checked next)."""

    key: str
    language: str
    split: str
    codes: np.ndarray
    text: str
    duration: float  # declared in the JSON (0 if none): summed as declared_hours of what is written


class SampleDecoder:
    """Decodes the samples of one build's settings."""

    def __init__(self, kind: Kind, schema: Schema, default_language: str | None, valid_fraction: float):
        self.kind, self.schema = kind, schema
        self.default_language, self.valid_fraction = default_language, valid_fraction
        self._codes_key, self._meta_key = schema.codes_key.lower(), schema.meta_key.lower()

    def decode(self, key: str, fields: dict[str, bytes], skip: Callable[[str, str | None], None]) -> Sample | None:
        """The sample, or None after `skip(reason, language or None)` if it is bad."""
        sch = self.schema
        codes_raw = fields.get(self._codes_key)
        meta_raw = fields.get(self._meta_key)
        meta: Any = {}
        language = self.default_language
        if codes_raw is None:
            return skip("missing_codes", None)
        if meta_raw is None:
            if self.kind == "tts" or language is None:
                return skip("missing_json", None)
        else:
            try:
                meta = parse_json(meta_raw)
            except (ValueError, UnicodeDecodeError):
                meta = None
            if not isinstance(meta, dict):
                return skip("bad_json", None)
            language = meta.get(sch.language_field, language)
        if not isinstance(language, str) or (language := language.strip().lower()) not in tl.LANGUAGES:
            return skip("unknown_language", None)
        try:
            codes = parse_npy(codes_raw)
        except ValueError:
            return skip("bad_npy", language)
        problem = codes_structure_problem(codes)  # the range is checked per batch: codes_in_range
        if problem:
            return skip(problem, language)
        text = ""
        if self.kind == "tts":
            text = meta.get(sch.text_field)
            if not isinstance(text, str) or not text.strip():
                return skip(codes_problem(codes) or "empty_text", language)  # a bad code is reported first
            text = text.strip()
        duration = meta.get(sch.duration_field)
        if not isinstance(duration, (int, float)) or isinstance(duration, bool) or not -1e300 < duration < 1e300:
            duration = 0.0  # absent, not a number, or beyond +-1e300 (NaN, infinities, integers too big for a float)
        split = "valid" if is_valid_key(key, self.valid_fraction) else "train"
        return Sample(key, language, split, codes, text, float(duration))
