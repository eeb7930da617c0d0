"""Speech data preparation: WebDataset shards (local and over a real S3 endpoint) -> Megatron
indexed datasets. Shards are written with webdataset's own TarWriter; expected documents come
from token_layout; datasets are read back with megatron-core's IndexedDataset and GPTDataset."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from speechlm import token_layout as tl
from speechlm.data import partials, speech, speech_samples
from speechlm.data import shards as shards_mod
from speechlm.token_layout import TokenLayout

REPO = Path(__file__).resolve().parent.parent
SEQ = 64  # small, so that splitting and dropping happen with small samples


# --- helpers -------------------------------------------------------------------------------------
def rand_codes(rng, n, dtype=np.int32):
    return rng.integers(0, tl.CODEC_SIZE, n).astype(dtype)


def write_shard(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as tw:
        for s in samples:
            tw.write(s)
    return path


def make_samples(rng, prefix: str, n: int, langs=("hi", "ta", "en"), max_codes=200, text=False):
    out = []
    for i in range(n):
        codes = rand_codes(rng, int(rng.integers(5, max_codes)), dtype=[np.int32, np.int64, np.uint16][i % 3])
        meta = {"language": langs[i % len(langs)], "duration": len(codes) / 50}
        if text:
            meta["text"] = " ".join(["namaste", "hello world", "speech", "bharat"][: 1 + i % 4] * (1 + i % 5))
        out.append({"__key__": f"{prefix}/{i:05d}", "codes.npy": codes, "json": meta})
    return out


def read_prefix(prefix) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [np.asarray(ds[i]).copy() for i in range(len(ds))]


def expected_audio(layout: TokenLayout, samples: list[dict], seq: int, frac: float) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for s in samples:
        lang = s["json"]["language"]
        split = "valid" if partials.is_valid_key(s["__key__"], frac) else "train"
        for piece in layout.split_audio_codes(s["codes.npy"], seq):
            out.setdefault(partials.prefix_name("audio", lang, split), []).append(layout.audio_document(piece, lang))
    return out


def assert_prefixes(out: Path, expected: dict[str, list[np.ndarray]]) -> None:
    written = sorted(p.stem for p in out.glob("*.idx"))
    assert written == sorted(expected)
    for name, docs in expected.items():
        got = read_prefix(out / name)
        assert len(got) == len(docs), name
        for g, e in zip(got, docs):
            np.testing.assert_array_equal(g, e)


def output_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".bin", ".idx") or p.name == "manifest.json"}


def load_cli(name: str):
    spec = importlib.util.spec_from_file_location(f"dp_{name}", REPO / "data_prep" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tagged_layout_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("layout-tags")
    TokenLayout(language_tags=True).save(d)
    return d


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    """Three local shards of audio samples (int32/int64/uint16 codes, some longer than SEQ)."""
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    samples = {}
    for k in range(3):
        samples[k] = make_samples(rng, f"s{k}", 40)
        write_shard(d / f"shard-{k:06d}.tar", samples[k])
    return d, [s for k in range(3) for s in samples[k]]


# --- documents ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tags", [False, True])
def test_audio_documents_read_back_exactly(local_shards, expanded_tiny_dir, tagged_layout_dir, tmp_path, tags):
    d, samples = local_shards
    model = tagged_layout_dir if tags else expanded_tiny_dir
    layout = TokenLayout.load(model)
    out = tmp_path / "out"
    summary = speech.build(str(d), model, out, "audio", seq_length=SEQ, valid_fraction=0.2, progress=False)
    assert not summary["failed"]
    expected = expected_audio(layout, samples, SEQ, 0.2)
    assert_prefixes(out, expected)
    assert any(n.endswith("_valid") for n in expected) and any(n.endswith("_train") for n in expected)

    m = json.loads((out / "manifest.json").read_text())
    assert m["layout_hash"] == layout.layout_hash and m["kind"] == "audio" and m["samples_read"] == 120
    assert m["skips"] == {} and m["shards"] == {"total": 3, "bad": []}
    long = [s for s in samples if len(s["codes.npy"]) > layout.max_codes_per_audio_document(SEQ)]
    assert long and sum(e["split_samples"] for e in m["datasets"].values()) == len(long)
    for name, entry in m["datasets"].items():
        for split in speech.SPLITS:
            docs = expected.get(f"{name}_{split}", [])
            assert entry[split]["documents"] == len(docs)
            assert entry[split]["tokens"] == sum(len(x) for x in docs)
            assert entry[split]["hours"] == round(entry[split]["codes"] / 50 / 3600, 6)
            assert all(len(x) <= SEQ for x in docs)
    assert m["totals"]["codes"] == sum(len(s["codes.npy"]) for s in samples)
    if tags:
        assert all(doc[0] == layout.lang_id("hi") for doc in read_prefix(out / "audio_hi_train"))


def test_gpt_dataset_reads_the_documents(local_shards, expanded_tiny_dir, tmp_path):
    """Megatron's GPTDataset over a built prefix yields exactly windows of the documents."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers import MegatronTokenizerBase

    layout = TokenLayout.load(expanded_tiny_dir)

    class Tok(MegatronTokenizerBase):  # GPTDataset needs eod, pad and vocab_size only
        vocab_size, eod, pad = tl.VOCAB_SIZE, tl.EOD_ID, layout.pad_id
        unique_identifiers = {"class": "Tok", "vocab_size": tl.VOCAB_SIZE}

        def __init__(self):
            super().__init__("", {})

        tokenize = detokenize = vocab = apply_chat_template = lambda self, *a: None

    d, samples = local_shards
    out = tmp_path / "out"
    speech.build(str(d), expanded_tiny_dir, out, "audio", seq_length=SEQ, valid_fraction=0.0, progress=False)
    prefix = str(out / "audio_hi_train")
    docs = expected_audio(layout, samples, SEQ, 0.0)["audio_hi_train"]
    n_tokens = sum(len(x) for x in docs)
    n_samples = (n_tokens - 1) // SEQ
    cfg = GPTDatasetConfig(
        random_seed=1234, sequence_length=SEQ, tokenizer=Tok(), blend=([prefix], None), split="100,0,0",
        path_to_cache=str(tmp_path / "cache"), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [n_samples, None, None], lambda: True, cfg).build()
    assert isinstance(train, GPTDataset) and len(train) == n_samples
    assert sorted(train.document_index.tolist()) == list(range(len(docs)))  # one epoch, every document
    stream = np.concatenate([docs[i] for i in train.document_index])
    for i in range(len(train)):
        k = int(train.shuffle_index[i])
        window = stream[k * SEQ : k * SEQ + SEQ + 1]
        s = train[i]
        np.testing.assert_array_equal(s["tokens"].numpy(), window[:-1])
        np.testing.assert_array_equal(s["labels"].numpy(), window[1:])
    assert (stream == tl.EOD_ID).sum() == len(docs)


def test_tts_documents_and_dropping(expanded_tiny_dir, reference_text_ids, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(expanded_tiny_dir)
    layout = TokenLayout.load(expanded_tiny_dir)
    rng = np.random.default_rng(1)
    samples = make_samples(rng, "t", 30, max_codes=60, text=True)
    samples[3]["json"]["text"] = "I said <|end_of_text|> aloud"  # plain text, not the special id
    samples[4]["json"]["text"] = "   "
    samples[5]["json"]["text"] = "type <|s_123|> and <|speech_start|>"  # text too, not codes or our specials
    write_shard(tmp_path / "tts-000000.tar", samples)
    out = tmp_path / "out"
    speech.build(str(tmp_path / "tts-000000.tar"), expanded_tiny_dir, out, "tts", seq_length=SEQ,
                 valid_fraction=0.0, progress=False)
    expected: dict[str, list[np.ndarray]] = {}
    too_long = 0
    for s in samples:
        text, lang, codes = s["json"]["text"].strip(), s["json"]["language"], s["codes.npy"]
        if not text:
            continue
        ids = reference_text_ids(text)
        if len(codes) > layout.max_codes_per_tts_document(SEQ, len(ids)):
            too_long += 1
            continue
        expected.setdefault(f"tts_{lang}_train", []).append(layout.tts_document(ids, codes, lang))
    assert too_long > 0
    assert_prefixes(out, expected)
    m = json.loads((out / "manifest.json").read_text())
    assert m["skips"] == {"empty_text": 1, "too_long": too_long}
    for name, entry in m["datasets"].items():  # declared durations of the written samples only
        assert entry["declared_hours"] == pytest.approx(entry["train"]["codes"] / 50 / 3600, abs=1e-6)
    assert all(len(x) <= SEQ for docs in expected.values() for x in docs)
    lang3 = samples[3]["json"]["language"]
    texts = [layout.decode_document(x).text_ids for x in read_prefix(out / f"tts_{lang3}_train")]
    assert [hf.decode(t) for t in texts].count("I said <|end_of_text|> aloud") == 1
    assert not any(tl.EOD_ID in t for t in texts)
    assert m["settings"]["tokenizer_sha256"]


@pytest.fixture(scope="module")
def reference_text_ids(llama3_tokenizer_dir):
    """Text ids by the reference: the unexpanded Llama-3 tokenizer, every special written as text."""
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(llama3_tokenizer_dir / "tokenizer.json"))
    ref.encode_special_tokens = True
    return lambda text: ref.encode(text, add_special_tokens=False).ids


# Literal token strings inside text: codec tokens (added, non-special tokens of the expanded
# tokenizer), our renamed specials, Llama's own specials and a reserved name, next to plain text.
LITERALS = ["a <|s_123|> b", "<|s_0|><|s_65535|>", "x<|speech_start|>y <|speech_end|> <|pad|>", "<|lang_hi|> नमस्ते",
            "I said <|end_of_text|> and <|begin_of_text|>", "<|reserved_special_token_3|> <|eot_id|>", "plain words"]


def test_text_ids_are_the_unexpanded_tokenizers(expanded_tiny_dir, reference_text_ids):
    """One text encoding (build_speech transcripts, build_text, synthesis prompts): the ids the
    original tokenizer gives, whatever token names the text spells out."""
    from speechlm.data import model_dir

    _, tok, _ = model_dir.load_model_dir(expanded_tiny_dir, need_tokenizer=True)
    got = model_dir.encode_texts(tok, LITERALS)
    assert got == [reference_text_ids(t) for t in LITERALS]
    assert all(i < tl.BOS_ID for ids in got for i in ids)  # no special, speech or layout id
    flat, counts = model_dir.encode_texts_flat(tok, LITERALS)  # the batch builds' form: the same ids
    assert flat.dtype == np.int32 and counts.tolist() == list(map(len, got)) and flat.tolist() == sum(got, [])


# --- bad input -----------------------------------------------------------------------------------
def test_bad_samples_and_shards_are_counted_not_written(expanded_tiny_dir, tmp_path):
    rng = np.random.default_rng(2)
    good = make_samples(rng, "g", 6, langs=("hi",), max_codes=50, text=True)
    c = rand_codes(rng, 20)
    bad = [
        {"__key__": "b/00", "codes.npy": np.append(c, 65536).astype(np.int32), "json": {"language": "hi", "text": "a"}},
        {"__key__": "b/01", "codes.npy": np.append(c, -1).astype(np.int64), "json": {"language": "hi", "text": "a"}},
        {"__key__": "b/02", "codes.npy": c.astype(np.float32), "json": {"language": "hi", "text": "a"}},
        {"__key__": "b/03", "codes.npy": c.reshape(2, 10), "json": {"language": "hi", "text": "a"}},
        {"__key__": "b/04", "codes.npy": np.zeros(0, np.int32), "json": {"language": "hi", "text": "a"}},
        {"__key__": "b/05", "codes.npy": c, "json": {"language": "hi", "text": ""}},
        {"__key__": "b/06", "codes.npy": c, "json": {"language": "xx", "text": "a"}},
        {"__key__": "b/07", "codes.npy": c},
        {"__key__": "b/08", "json": {"language": "hi", "text": "a"}},
        {"__key__": "b/09", "codes.npy": c, "json": b"{not json"},
        {"__key__": "b/10", "codes.npy": b"garbage", "json": {"language": "hi", "text": "a"}},
        {"__key__": "b/11", "codes.npy": c, "json": {"text": "a"}},
        # a bad code counts before a missing transcript and before a transcript too long to fit
        {"__key__": "b/12", "codes.npy": np.append(c, 70000).astype(np.int32), "json": {"language": "hi", "text": " "}},
        {"__key__": "b/13", "codes.npy": np.append(c, -5).astype(np.int32), "json": {"language": "hi", "text": "a " * SEQ}},
    ]
    mixed = good[:3] + bad + good[3:]
    d = tmp_path / "in"
    d.mkdir()
    write_shard(d / "a-000000.tar", mixed)
    # corrupt: a flipped byte in the 9th header (a pax + a file header per member); truncated: cut inside a member, no end marker
    write_shard(d / "c-000000.tar", good)
    raw = bytearray((d / "c-000000.tar").read_bytes())
    headers = [i for i in range(0, len(raw), 512) if raw[i + 257 : i + 262] == b"ustar"]
    raw[headers[8] + 3] ^= 0xFF
    (d / "c-000000.tar").write_bytes(bytes(raw))
    write_shard(d / "t-000000.tar", good)
    full = (d / "t-000000.tar").read_bytes()
    (d / "t-000000.tar").write_bytes(full[: len(full) // 2 + 100])
    (d / "z-000000.tar.gz").write_bytes(b"\x1f\x8b\x08 not gzip at all")

    for kind in ("tts", "audio"):
        out = tmp_path / f"out-{kind}"
        speech.build(str(d), expanded_tiny_dir, out, kind, seq_length=SEQ, valid_fraction=0.0, progress=False)
        m = json.loads((out / "manifest.json").read_text())
        want = {
            "codes_range": 4, "codes_dtype": 1, "codes_shape": 1, "codes_empty": 1, "unknown_language": 2,
            "missing_json": 1, "missing_codes": 1, "bad_json": 1, "bad_npy": 1,
        }
        if kind == "tts":
            want["empty_text"] = 1
        assert m["skips"] == want
        bad_shards = {Path(b["shard"]).name: b for b in m["shards"]["bad"]}
        assert sorted(bad_shards) == ["c-000000.tar", "t-000000.tar", "z-000000.tar.gz"]
        assert all(b["error"].startswith("corrupt") for b in bad_shards.values())
        assert "checksum" in bad_shards["c-000000.tar"]["error"]
        # the corrupt shard keeps sample 0 (sample 1 may be incomplete when header 8, the first of
        # sample 2, is bad: it is dropped); the truncated one keeps its complete samples
        assert bad_shards["c-000000.tar"]["samples_read"] == 1
        docs = read_prefix(out / f"{kind}_hi_train")
        n_good = len(good) + 1 + bad_shards["t-000000.tar"]["samples_read"] + (kind == "audio")  # b/05: audio needs no text
        assert len(docs) == n_good
        for doc in docs:  # every written document decodes under the layout
            dec = TokenLayout().decode_document(doc)
            assert dec.kind == kind and len(dec.codes) > 0


def test_refuses_model_dir_without_valid_layout(local_shards, expanded_tiny_dir, tmp_path):
    d, _ = local_shards
    with pytest.raises(speech.SpeechDataError, match="token_layout.json"):
        speech.build(str(d), tmp_path, tmp_path / "o1", "audio", progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    lay = json.loads((expanded_tiny_dir / tl.LAYOUT_FILE).read_text())
    lay["layout_hash"] = "0" * 64
    (bad / tl.LAYOUT_FILE).write_text(json.dumps(lay))
    with pytest.raises(speech.SpeechDataError, match="hash mismatch"):
        speech.build(str(d), bad, tmp_path / "o2", "audio", progress=False)
    # a second run into the same dir with other settings is refused, not mixed
    speech.build(str(d), expanded_tiny_dir, tmp_path / "o3", "audio", seq_length=SEQ, progress=False)
    with pytest.raises(speech.SpeechDataError, match="other settings"):
        speech.build(str(d), expanded_tiny_dir, tmp_path / "o3", "audio", seq_length=SEQ * 2, progress=False)


@pytest.mark.parametrize("dtype", [np.int32, ">i4", np.int64, np.uint32, np.uint16, np.uint8])
def test_the_range_is_checked_per_batch_with_the_same_verdicts(dtype):
    """codes_in_range (one check a chunk) keeps exactly the samples codes_problem passes, in order,
    and counts the others as codes_range: uniform chunks with and without a bad code, mixed dtypes."""
    rng = np.random.default_rng(5)
    info = np.iinfo(np.dtype(dtype))
    batch = []
    for i in range(100):
        codes = rng.integers(0, min(tl.CODEC_SIZE, int(info.max) + 1), int(rng.integers(1, 40)))
        if i in (7, 40, 41, 99) and info.max >= tl.CODEC_SIZE:
            codes[-1] = tl.CODEC_SIZE + i
        if i == 13 and info.min < 0:
            codes[0] = -1
        batch.append(speech_samples.Sample(f"k{i}", "hi", "train", codes.astype(dtype if i % 50 != 33 else np.int64),
                                           "t", 0.0))
    skipped = []
    kept = speech_samples.codes_in_range(batch, lambda reason, lang: skipped.append((reason, lang)))
    want = [p for p in batch if speech_samples.codes_problem(p.codes) is None]
    assert [p.key for p in kept] == [p.key for p in want]
    assert skipped == [("codes_range", "hi")] * (len(batch) - len(want))
    assert len(want) < len(batch) or info.max < tl.CODEC_SIZE


@pytest.mark.parametrize("raw", [
    b'{"text": "\\u0928\\u092e", "language": "hi", "duration": 1.25}', '{"text": "नम", "duration": 3}'.encode(),
    b'{"duration": NaN, "text": "a"}', b'{"duration": 1e400}', b'{"text": "\\ud800 lone surrogate"}',
    b'\xef\xbb\xbf{"text": "bom"}', '{"text": "utf-16"}'.encode("utf-16"), b'{"a": 1, "a": 2}',
    b'{"duration": 123456789012345678901234567890}', b'{"duration": -0.0}', b' [1, 2] ', b'{"t": "\xff"}',
    b'{not json', b'',
])
def test_sample_metadata_parses_as_the_standard_library_does(raw):
    """parse_json (orjson, falling back to json) gives json.loads' values, or fails where it fails;
    a numeric field beyond 64-bit integers is the same float either way."""
    try:
        want = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        with pytest.raises(type(e) if isinstance(e, UnicodeDecodeError) else ValueError):
            speech_samples.parse_json(raw)
        return
    got = speech_samples.parse_json(raw)
    if isinstance(want, dict) and isinstance(want.get("duration"), int):
        assert float(got["duration"]) == float(want["duration"])
        got, want = {**got, "duration": 0}, {**want, "duration": 0}
    assert json.dumps(got) == json.dumps(want)  # NaN-safe, and -0.0 stays -0.0


def test_a_declared_duration_that_is_not_a_finite_number_counts_as_none():
    dec = speech_samples.SampleDecoder("tts", speech_samples.Schema(), None, 0.0)
    codes = io.BytesIO()
    np.save(codes, np.arange(5, dtype=np.int32))
    for raw, want in [(b"1.5", 1.5), (b"NaN", 0.0), (b"Infinity", 0.0), (b"-1e400", 0.0), (b"9" * 400, 0.0),
                      (b"true", 0.0), (b'"2"', 0.0)]:
        meta = b'{"language": "hi", "text": "a", "duration": ' + raw + b"}"
        sample = dec.decode("k", {"codes.npy": codes.getvalue(), "json": meta}, lambda *a: pytest.fail(str(a)))
        assert sample.duration == want, raw


# --- tar reading ---------------------------------------------------------------------------------
def test_tar_reader_matches_webdataset(tmp_path):
    import gzip

    rng = np.random.default_rng(3)
    samples = make_samples(rng, "x" * 120 + "/deep", 5)  # names longer than the 100-byte field
    samples.append({"__key__": "odd.key", "codes.npy": rand_codes(rng, 3), "TXT": "upper-case extension"})
    write_shard(tmp_path / "a.tar", samples)
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    ref = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
           for s in wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False)]
    for name in ("a.tar", "a.tar.gz"):
        with shards_mod.open_shard(str(tmp_path / name)) as f:
            ours = list(shards_mod.iter_samples(f))
        assert [k for k, _ in ours] == [k for k, _ in ref]
        for (_, a), (_, b) in zip(ours, ref):
            assert {k.lower(): v for k, v in b.items()} == a
    arr = np.arange(12, dtype=">i8").reshape(3, 4, order="F")
    buf = io.BytesIO()
    np.save(buf, arr)
    np.testing.assert_array_equal(speech_samples.parse_npy(buf.getvalue()), arr)


# --- S3 ------------------------------------------------------------------------------------------
def test_s3_stream_with_fault_resumes_and_matches_local(local_shards, expanded_tiny_dir, s3_server, tmp_path,
                                                         monkeypatch, caplog):
    import botocore.response
    from urllib3.exceptions import ProtocolError

    d, _ = local_shards
    bucket = s3_server.new_bucket()
    for p in sorted(d.glob("*.tar")):
        s3_server.upload(bucket, p, f"pt/{p.name}")
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(speech.s3.time, "sleep", lambda s: None)

    local = tmp_path / "local"
    speech.build(str(d), expanded_tiny_dir, local, "audio", seq_length=SEQ, progress=False)

    # in every shard the connection delivers 50 kB, then breaks (once)
    real_read = botocore.response.StreamingBody.read
    state = {"broken": set(), "ranges": []}

    def flaky_read(self, amt=None):
        key = getattr(self, "_test_key", None)
        if key is None or key in state["broken"]:
            return real_read(self, amt)
        if not getattr(self, "_test_started", False):
            self._test_started = True
            return real_read(self, 50_000)
        state["broken"].add(key)
        raise ProtocolError("Connection broken: IncompleteRead (injected)")

    orig_make = speech.s3.make_client

    def tagging_client(settings=None):
        client = orig_make(settings)
        orig_get = client.get_object

        def get_object(**kw):
            resp = orig_get(**kw)
            resp["Body"]._test_key = kw["Key"]
            if "Range" in kw:
                state["ranges"].append((kw["Key"], kw["Range"], resp["ResponseMetadata"]["HTTPStatusCode"]))
            return resp

        client.get_object = get_object
        return client

    monkeypatch.setattr(speech.s3, "make_client", tagging_client)
    monkeypatch.setattr(botocore.response.StreamingBody, "read", flaky_read)

    out = tmp_path / "s3"
    with caplog.at_level(logging.WARNING, logger="speechlm.data.s3"):
        summary = speech.build(f"s3://{bucket}/pt/shard-{{000000..000002}}.tar", expanded_tiny_dir, out, "audio",
                               seq_length=SEQ, progress=False)
    assert not summary["failed"]
    assert len(state["ranges"]) == 3 and all(status == 206 for _, _, status in state["ranges"])
    assert all(r == "bytes=50000-" for _, r, _ in state["ranges"])
    assert "resuming" in caplog.text and "testing" not in caplog.text  # never a key in the logs
    a, b = output_bytes(local), output_bytes(out)
    assert [k for k in a if k != "manifest.json"] == [k for k in b if k != "manifest.json"]
    for k in a:
        if k != "manifest.json":
            assert a[k] == b[k], k
    ma, mb = json.loads(a["manifest.json"]), json.loads(b["manifest.json"])
    assert ma["datasets"] == mb["datasets"] and ma["totals"] == mb["totals"]

    # a prefix spec lists the bucket; a missing object is recorded, not fatal
    out2 = tmp_path / "s3-prefix"
    speech.build([f"s3://{bucket}/pt/", f"s3://{bucket}/pt/missing-000009.tar"], expanded_tiny_dir, out2,
                 "audio", seq_length=SEQ, progress=False)
    m2 = json.loads((out2 / "manifest.json").read_text())
    assert m2["shards"]["total"] == 4 and [b["error"][:7] for b in m2["shards"]["bad"]] == ["missing"]
    assert m2["datasets"] == ma["datasets"]


# --- resumability and parallelism ------------------------------------------------------------------
def test_kill_and_rerun_gives_identical_bytes(local_shards, expanded_tiny_dir, tmp_path, monkeypatch):
    d, _ = local_shards
    ref = tmp_path / "ref"
    speech.build(str(d), expanded_tiny_dir, ref, "audio", seq_length=SEQ, valid_fraction=0.2, progress=False)

    out = tmp_path / "killed"
    real_finalize = speech._ShardWriter.finalize
    calls = {"n": 0}

    def dying_finalize(self):
        calls["n"] += 1
        names = real_finalize(self)
        if calls["n"] == 2:  # "killed" after the 2nd shard's files are written, before its rename
            raise KeyboardInterrupt
        return names

    with monkeypatch.context() as mp:
        mp.setattr(speech._ShardWriter, "finalize", dying_finalize)
        mp.setattr(shutil, "rmtree", lambda *a, **k: None)  # SIGKILL cleans nothing up
        with pytest.raises(KeyboardInterrupt):
            speech.build(str(d), expanded_tiny_dir, out, "audio", seq_length=SEQ, valid_fraction=0.2, progress=False)
    parts = out / partials.PARTIALS
    assert len([p for p in parts.iterdir() if not p.name.startswith(".")]) == 1
    assert any(p.name.startswith(".tmp-") for p in parts.iterdir())  # the dead task's leftovers
    (out / ".audio_hi_train.tmp.bin").write_bytes(b"half a merge")  # and a killed merge's

    done_before = {p.name: p.stat().st_mtime_ns for p in parts.iterdir() if not p.name.startswith(".")}
    speech.build(str(d), expanded_tiny_dir, out, "audio", seq_length=SEQ, valid_fraction=0.2, progress=False)
    for name, mtime in done_before.items():  # the finished shard was not redone
        assert (parts / name).stat().st_mtime_ns == mtime
    assert not any(p.name.startswith(".tmp-") for p in parts.iterdir())
    assert output_bytes(out) == output_bytes(ref)


def test_task_counts_give_identical_bytes(local_shards, expanded_tiny_dir, tmp_path, capsys):
    d, _ = local_shards
    one = tmp_path / "one"
    speech.build(str(d), expanded_tiny_dir, one, "audio", seq_length=SEQ, valid_fraction=0.2, progress=False)
    three = tmp_path / "three"
    cli = load_cli("build_speech")
    for i in (2, 0, 1):  # any order
        rc = cli.main(["--input", str(d), "--model", str(expanded_tiny_dir), "--output", str(three), "--kind", "audio",
                       "--seq-length", str(SEQ), "--valid-fraction", "0.2", "--num-tasks", "3", "--task-index", str(i),
                       "--quiet"])
        assert rc == 0
        if i != 1:
            assert load_cli("merge_speech").main(["--output", str(three), "--quiet"]) == 2  # not all done yet
    assert not (three / "manifest.json").exists()
    assert load_cli("merge_speech").main(["--output", str(three), "--quiet"]) == 0
    assert output_bytes(three) == output_bytes(one)
    assert partials.task_shards([f"s{i}" for i in range(7)], 3, 1) == ["s1", "s4"]

    # inspect shows what the model reads
    capsys.readouterr()
    assert load_cli("inspect_data").main([str(three / "audio_ta_train"), "--n", "2", "--model", str(expanded_tiny_dir)]) == 0
    shown = capsys.readouterr().out
    assert "audio lang=- tokens=" in shown and "codes:" in shown


def test_inspect_detokenizes_tts(expanded_tiny_dir, tmp_path, capsys):
    rng = np.random.default_rng(4)
    samples = make_samples(rng, "t", 4, langs=("hi",), max_codes=20, text=True)
    write_shard(tmp_path / "t.tar", samples)
    speech.build(str(tmp_path / "t.tar"), expanded_tiny_dir, tmp_path / "o", "tts", seq_length=SEQ,
                 valid_fraction=0.0, progress=False)
    capsys.readouterr()
    assert load_cli("inspect_data").main([str(tmp_path / "o" / "tts_hi_train"), "--model", str(expanded_tiny_dir)]) == 0
    shown = capsys.readouterr().out
    assert f"text: {samples[1]['json']['text']!r}" in shown


def test_inputs_that_match_nothing_are_one_line_errors(expanded_tiny_dir, tmp_path, capsys):
    """A pattern or directory with no shards, or a merge of nothing: one line, exit 2, nothing written."""
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    for spec in (str(tmp_path / "none-*.tar"), str(tmp_path / "empty")):
        capsys.readouterr()
        rc = load_cli("build_speech").main(["--input", spec, "--model", str(expanded_tiny_dir), "--output", str(out),
                                            "--kind", "audio", "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: no shards found") and err.count("\n") == 1, err
        assert not out.exists()
    assert load_cli("merge_speech").main(["--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not out.exists(), err


def test_cli_help():
    for name in ("build_speech", "merge_speech", "inspect_data"):
        r = subprocess.run([sys.executable, str(REPO / "data_prep" / f"{name}.py"), "--help"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage:" in r.stdout, r.stderr



def test_s3_outage_leaves_shard_not_done_and_rerun_completes(local_shards, expanded_tiny_dir, s3_server, tmp_path,
                                                             monkeypatch):
    import functools

    import botocore.response
    from urllib3.exceptions import ProtocolError

    d, _ = local_shards
    bucket = s3_server.new_bucket()
    for p in sorted(d.glob("*.tar")):
        s3_server.upload(bucket, p, f"pt/{p.name}")
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(speech.s3.time, "sleep", lambda s: None)
    spec, out = f"s3://{bucket}/pt/", tmp_path / "out"

    real_read, real_get = botocore.response.StreamingBody.read, speech.s3.ResumableBody.__init__
    with monkeypatch.context() as mp:  # every read of shard 1 breaks: an outage longer than the retries
        def read(self, amt=None):
            if getattr(self, "_test_dead", False):
                raise ProtocolError("Connection reset (injected)")
            return real_read(self, amt)

        orig_make = speech.s3.make_client

        def client_with_dead_shard(settings=None):
            client = orig_make(settings)
            get = client.get_object

            def get_object(**kw):
                resp = get(**kw)
                resp["Body"]._test_dead = kw["Key"].endswith("shard-000001.tar")
                return resp

            client.get_object = get_object
            return client

        mp.setattr(speech.s3, "make_client", client_with_dead_shard)
        mp.setattr(botocore.response.StreamingBody, "read", read)
        mp.setattr(speech.s3.ResumableBody, "__init__", functools.partialmethod(real_get, max_resumes=2))
        summary = speech.build(spec, expanded_tiny_dir, out, "audio", seq_length=SEQ, progress=False)
    assert [Path(u).name for u, _ in summary["failed"]] == ["shard-000001.tar"]
    assert "gave up after 2 resumes" in summary["failed"][0][1]
    assert not (out / "manifest.json").exists()
    with pytest.raises(speech.SpeechDataError, match="1 of 3 shards are not done"):
        speech.merge(out, progress=False)

    summary = speech.build(spec, expanded_tiny_dir, out, "audio", seq_length=SEQ, progress=False)  # S3 is back
    assert not summary["failed"] and summary["manifest"]["shards"]["bad"] == []
    ref = tmp_path / "ref"
    speech.build(str(d), expanded_tiny_dir, ref, "audio", seq_length=SEQ, progress=False)
    a, b = output_bytes(ref), output_bytes(out)
    assert {k: v for k, v in a.items() if k != "manifest.json"} == {k: v for k, v in b.items() if k != "manifest.json"}
