"""Text data preparation: jsonl / parquet corpora (local and over a real S3 endpoint) -> Megatron
indexed datasets of `layout.text_document`s. Expected documents come from the HF fast tokenizer
of the expanded model and token_layout; datasets are read back with megatron-core."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speechlm.data import mix, partials, speech
from speechlm.data import text as T
from speechlm.data import text_filters as TF
from speechlm.token_layout import EOD_ID, TokenLayout

REPO = Path(__file__).resolve().parent.parent
SEQ = 64
NO_FILTERS = T.Filters(0, 0.0, None, None)

EN = "The quick brown fox jumps over the lazy dog. Language models learn from large amounts of text."
HI = "भारत एक विशाल देश है। यहाँ अनेक भाषाएँ बोली जाती हैं और हर क्षेत्र की अपनी संस्कृति है।"
TA = "தமிழ் உலகின் மிகப் பழமையான மொழிகளில் ஒன்றாகும். இது இந்தியா மற்றும் இலங்கையில் பேசப்படுகிறது."


# --- helpers -------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    keys = sorted({k for r in rows for k in r})
    pq.write_table(pa.table({k: [r.get(k) for r in rows] for k in keys}), path, row_group_size=3)
    return path


def corpus_rows(base: str, lang_values: list[str], n: int) -> list[dict]:
    # varied lengths: some short, some several times SEQ tokens (split into pieces)
    return [{"text": "\n".join([f"{i}. {base}"] * (1 + (i * 7) % 11)), "language": lang_values[i % len(lang_values)], "id": i}
            for i in range(n)]


def read_prefix(prefix) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [np.asarray(ds[i]).copy() for i in range(len(ds))]


@pytest.fixture(scope="module")
def hf_tok(expanded_tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(expanded_tiny_dir)


def expected_docs(hf_tok, records: list[tuple[str, str]], frac: float, seq: int, source: str) -> dict[str, list[np.ndarray]]:
    """(lang, text) in build order -> {prefix name: documents}: the tokenizer's ids wrapped by
    layout.text_document, split into near-equal pieces of at most seq - 2 ids."""
    layout = TokenLayout()
    out: dict[str, list[np.ndarray]] = {}
    for lang, text in records:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        n = -(-len(ids) // (seq - 2))
        pieces = np.array_split(np.asarray(ids), n) if n > 1 else [np.asarray(ids)]
        split = "valid" if partials.is_valid_key(text, frac) else "train"
        out.setdefault(f"{source}_{lang}_{split}", []).extend(layout.text_document(p) for p in pieces)
    return out


def built_docs(out: Path) -> dict[str, list[np.ndarray]]:
    return {p.stem: read_prefix(p.with_suffix("")) for p in sorted(out.glob("*.idx"))}


def cli():
    spec = importlib.util.spec_from_file_location("build_text_cli", REPO / "data_prep" / "build_text.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    """en jsonl, hi jsonl.gz, ta parquet; language values as corpora write them."""
    d = tmp_path_factory.mktemp("corpus")
    files = [
        (write_jsonl(d / "a_en.jsonl", corpus_rows(EN, ["en", "English"], 9))),
        (write_jsonl(d / "b_hi.jsonl.gz", corpus_rows(HI, ["hi", "hin_Deva", "Hindi"], 9))),
        (write_parquet(d / "c_ta.parquet", corpus_rows(TA, ["ta", "tam", "ta-IN"], 8))),
    ]
    records = []
    for f, base, lang, n in zip(files, (EN, HI, TA), ("en", "hi", "ta"), (9, 9, 8)):
        records += [(lang, r["text"]) for r in corpus_rows(base, ["x"], n)]
    return d, records


# --- token-exact round trip ----------------------------------------------------------------------
def test_documents_read_back_token_exact(corpus, expanded_tiny_dir, hf_tok, tmp_path):
    d, records = corpus
    out = tmp_path / "out"
    summary = T.build(str(d), expanded_tiny_dir, out, "web", seq_length=SEQ, valid_fraction=0.3,
                      filters=NO_FILTERS, progress=False)
    m = summary["manifest"]
    want = expected_docs(hf_tok, records, 0.3, SEQ, "web")
    got = built_docs(out)
    assert sorted(got) == sorted(want) and {"web_en_valid", "web_hi_valid", "web_ta_valid"} <= set(got)
    for name in want:
        assert len(got[name]) == len(want[name]), name
        for a, b in zip(got[name], want[name]):
            np.testing.assert_array_equal(a, b)
    # splitting: every document fits, and some records were split
    assert max(len(x) for docs in got.values() for x in docs) <= SEQ
    assert sum(e["split_samples"] for e in m["datasets"].values()) > 0
    # the manifest counts what the files hold
    assert m["kind"] == "text" and m["source"] == "web" and m["layout_hash"] == TokenLayout().layout_hash
    for name, e in m["datasets"].items():
        for split in ("train", "valid"):
            docs = got[f"{name}_{split}"]
            assert e[split]["documents"] == len(docs) and e[split]["tokens"] == sum(len(x) for x in docs)
    assert m["samples_read"] == 26 and m["skips"] == {}


def test_split_ids_rule():
    ids = np.arange(130)
    pieces = T.split_ids(ids, 62)
    assert [len(p) for p in pieces] == [44, 43, 43]  # ceil(130 / 62) = 3 near-equal pieces
    np.testing.assert_array_equal(np.concatenate(pieces), ids)
    assert len(T.split_ids(ids[:62], 62)) == 1


def test_literal_special_token_text_stays_text(expanded_tiny_dir, tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"text": "before <|end_of_text|> after", "language": "en"}])
    out = tmp_path / "out"
    T.build(str(f), expanded_tiny_dir, out, "web", valid_fraction=0.0, filters=NO_FILTERS, progress=False)
    (doc,) = read_prefix(out / "web_en_train")
    assert doc[0] == TokenLayout.bos_id and doc[-1] == EOD_ID and EOD_ID not in doc[1:-1].tolist()


def test_token_strings_in_text_are_text_like_the_original_tokenizer(expanded_tiny_dir, llama3_tokenizer_dir, tmp_path):
    """Codec-token strings (added tokens of the expanded tokenizer), our specials' and Llama's names
    in a corpus are text: the ids of the unexpanded tokenizer, and the records after them are kept."""
    from tokenizers import Tokenizer

    texts = [EN, "a <|s_123|> b <|s_0|><|s_65535|>", "x<|speech_start|>y <|lang_hi|> <|pad|> <|end_of_text|>", HI]
    f = write_jsonl(tmp_path / "x.jsonl", [{"text": t, "language": "en"} for t in texts])
    out = tmp_path / "out"
    m = T.build(str(f), expanded_tiny_dir, out, "web", valid_fraction=0.0, filters=NO_FILTERS, progress=False)["manifest"]
    assert m["files"]["bad"] == [] and m["skips"] == {}
    ref = Tokenizer.from_file(str(llama3_tokenizer_dir / "tokenizer.json"))
    ref.encode_special_tokens = True
    want = [TokenLayout().text_document(ref.encode(t, add_special_tokens=False).ids) for t in texts]
    got = read_prefix(out / "web_en_train")
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_inputs_that_match_nothing_are_one_line_errors(expanded_tiny_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    for spec in (str(tmp_path / "none-*.jsonl"), str(tmp_path / "empty")):
        capsys.readouterr()
        rc = cli()(["--input", spec, "--model", str(expanded_tiny_dir), "--output", str(out), "--source", "web",
                    "--language", "en", "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: no input files found") and err.count("\n") == 1, err
        assert not out.exists()  # nothing written


# --- filters -------------------------------------------------------------------------------------
def test_letter_share_counts_indic_marks():
    for s in (HI, TA):
        naive = sum(c.isalpha() for c in s if not c.isspace()) / sum(not c.isspace() for c in s)
        assert naive < 0.7 < TF.letter_share(s)  # vowel signs/viramas are Mn/Mc: letters for us
    assert TF.letter_share("12345 67890 !!!") == 0.0
    assert TF.letter_share("abc 123") == pytest.approx(0.5)
    assert TF.letter_share("😀 ab") == pytest.approx(2 / 3)  # outside the BMP: the slow path
    text = HI + " 12 " + TA + " x!"
    slow = [TF._is_letter(c) for c in text if not c.isspace()]
    assert TF.letter_share(text) == pytest.approx(sum(slow) / len(slow))


def test_boilerplate_anchors_cover_the_patterns():
    import re

    for p in TF.BOILERPLATE_PATTERNS:  # the fast pre-check must never hide a match
        sample = {"accept (all )?cookies": "accept cookies", "terms (of use|and conditions|of service)": "terms of use",
                  "© ?\\d{4}": "© 2024", "powered by (wordpress|blogger)": "powered by wordpress",
                  "share on (facebook|twitter|whatsapp)": "share on twitter"}.get(p, p)
        assert re.search(p, sample, re.IGNORECASE), p
        assert TF.boilerplate_line_share(sample.upper() if "©" not in sample else sample) == 1.0, p


def test_each_filter_rule():
    f = T.Filters()
    long_en = " ".join([EN] * 3)
    assert T.filter_reason(long_en, f) is None
    assert T.filter_reason(" \n\t", f) == "empty_text"
    assert T.filter_reason(EN, f) == "too_short"
    assert T.filter_reason("| 2021 | 34.5 | 17,000 | 88 |\n" * 12, f) == "low_letter_share"
    assert T.filter_reason("\n".join([EN] * 4), f) == "repeated_lines"
    page = "\n".join([EN, HI, TA, "Click here to subscribe", "© 2024 Example Media. All rights reserved."])
    assert T.filter_reason(page, f) == "boilerplate"  # 2 of 5 lines > 0.2
    assert T.filter_reason("\n".join([EN, HI, TA, EN + " x", HI + " y", "Cookie policy"]), f) is None  # 1/6
    assert T.filter_reason(" ".join([HI] * 3), f) is None and T.filter_reason(" ".join([TA] * 3), f) is None
    off = NO_FILTERS
    assert T.filter_reason(EN, off) is None and T.filter_reason("\n".join([EN] * 4), off) is None


def test_skips_are_counted_by_reason(expanded_tiny_dir, tmp_path):
    long_hi = " ".join([HI] * 3)
    rows = [
        {"text": long_hi, "language": "hi"},
        {"text": long_hi + " दो", "language": "Hindi"},
        {"text": "छोटा", "language": "hi"},  # too_short
        {"text": "१२३४ ५६७८ ९०१२ ३४५६ " * 20, "language": "hi"},  # low_letter_share (Devanagari digits)
        {"text": "\n".join([HI] * 5), "language": "hi"},  # repeated_lines
        {"text": "\n".join([HI, "Click here", "All rights reserved", "Privacy policy"]) + " " * 200, "language": "hi"},
        {"text": "   ", "language": "hi"},  # empty_text
        {"text": None, "language": "hi"},  # missing_text
        {"text": long_hi},  # unknown_language (no field, no --language)
        {"text": long_hi, "language": "French"},  # other_language
        {"text": long_hi, "language": "??"},  # unknown_language
    ]
    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "x.jsonl", rows)
    m = T.build(str(d), expanded_tiny_dir, tmp_path / "out", "web", valid_fraction=0.0, progress=False)["manifest"]
    assert m["skips"] == {"boilerplate": 1, "empty_text": 1, "low_letter_share": 1, "missing_text": 1,
                          "other_language": 1, "repeated_lines": 1, "too_short": 1, "unknown_language": 2}
    e = m["datasets"]["web_hi"]
    assert e["train"]["samples"] == 2 and sum(e["skips"].values()) == 6
    assert set(T.SKIP_REASONS) >= set(m["skips"])


@pytest.mark.parametrize("value,code", [("hi", "hi"), ("HI", "hi"), ("hin", "hi"), ("Hindi", "hi"), ("hin_Deva", "hi"),
                                        ("hi-IN", "hi"), ("Odia", "or"), ("ory_Orya", "or"), ("French", ""),
                                        ("fra", ""), ("fra_Latn", ""), ("zh-Hans", ""), ("", None), (None, None), ("??", None)])
def test_normalise_language(value, code):
    assert T.normalise_language(value) == code


# --- Aya template, fixed language, CLI -----------------------------------------------------------
def test_aya_template(expanded_tiny_dir, hf_tok, tmp_path, capsys):
    rows = [
        {"inputs": "भारत की राजधानी क्या है?", "targets": "भारत की राजधानी नई दिल्ली है।", "language": "Hindi", "language_code": "hin"},
        {"inputs": "  தமிழ் எங்கே பேசப்படுகிறது? ", "targets": "தமிழ்நாட்டில்.", "language": "Tamil", "language_code": "tam"},
        {"inputs": "Quelle est la capitale ?", "targets": "Paris.", "language": "French", "language_code": "fra"},
        {"inputs": "What is 2 + 2?", "targets": None, "language": "English", "language_code": "eng"},
    ]
    d = tmp_path / "aya"
    d.mkdir()
    write_parquet(d / "train.parquet", rows)
    out = tmp_path / "out"
    rc = cli()(["--input", str(d / "train.parquet"), "--model", str(expanded_tiny_dir), "--output", str(out),
                "--source", "aya", "--template", "aya", "--valid-fraction", "0", "--quiet"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["skips"] == {"missing_text": 1, "other_language": 1}
    assert m["settings"]["template"] == "{inputs}\n\n{targets}"
    layout = TokenLayout()
    for lang, r in (("hi", rows[0]), ("ta", rows[1])):
        text = f"{r['inputs'].strip()}\n\n{r['targets'].strip()}"
        (doc,) = read_prefix(out / f"aya_{lang}_train")
        np.testing.assert_array_equal(doc, layout.text_document(hf_tok(text, add_special_tokens=False)["input_ids"]))
    assert "aya_hi" in capsys.readouterr().out


def test_instruction_preset_keeps_short_pairs(expanded_tiny_dir, hf_tok, tmp_path):
    """Instruction data (an Aya-like pair, here already rendered into one field) has its own filters;
    the web-text default still drops short snippets."""
    pair = "2 + 2 कितना होता है?\n\n2 + 2 = 4 होता है।"  # short, and digits lower the letter share
    snippet = "यहाँ क्लिक करें"
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"text": pair, "language": "hi"}, {"text": snippet, "language": "hi"}])
    args = ["--input", str(f), "--model", str(expanded_tiny_dir), "--source", "aya", "--valid-fraction", "0", "--quiet"]
    assert cli()([*args, "--output", str(tmp_path / "web")]) == 0
    assert json.loads((tmp_path / "web" / "manifest.json").read_text())["skips"] == {"too_short": 2}
    assert cli()([*args, "--output", str(tmp_path / "inst"), "--preset", "instruction"]) == 0
    m = json.loads((tmp_path / "inst" / "manifest.json").read_text())
    assert m["skips"] == {} and m["settings"]["filters"] == dataclasses.asdict(TF.FILTER_PRESETS["instruction"])
    docs = read_prefix(tmp_path / "inst" / "aya_hi_train")
    np.testing.assert_array_equal(docs[0], TokenLayout().text_document(hf_tok(pair, add_special_tokens=False)["input_ids"]))
    assert T.filter_reason(pair, T.Filters()) == "too_short" and T.filter_reason(snippet, T.Filters()) == "too_short"
    # a flag still overrides the preset's value
    assert cli()([*args, "--output", str(tmp_path / "inst50"), "--preset", "instruction", "--min-chars", "50"]) == 0
    assert json.loads((tmp_path / "inst50" / "manifest.json").read_text())["skips"] == {"too_short": 2}


def test_fixed_language_and_cli_errors(expanded_tiny_dir, tmp_path, capsys):
    d = tmp_path / "wiki"
    d.mkdir()
    write_jsonl(d / "ta.jsonl", [{"text": " ".join([TA] * 3)}, {"text": " ".join([TA] * 4)}])
    out = tmp_path / "out"
    args = ["--input", str(d), "--model", str(expanded_tiny_dir), "--output", str(out), "--source", "wiki", "--quiet"]
    assert cli()([*args, "--language", "ta", "--valid-fraction", "0"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["datasets"]) == ["wiki_ta"] and m["datasets"]["wiki_ta"]["train"]["samples"] == 2
    # a custom template from the shell: a typed \n means a newline; a blank language value takes --language
    write_jsonl(d / "qa.jsonl", [{"q": "கேள்வி", "a": "பதில்", "language": " "}])
    assert cli()(["--input", str(d / "qa.jsonl"), "--model", str(expanded_tiny_dir), "--output", str(tmp_path / "qa"),
                  "--source", "qa", "--template", "Q: {q}\\nA: {a}", "--language", "ta", "--quiet"]) == 0
    m = json.loads((tmp_path / "qa" / "manifest.json").read_text())
    assert m["settings"]["template"] == "Q: {q}\nA: {a}" and m["datasets"]["qa_ta"]["train"]["samples"] + m["datasets"]["qa_ta"]["valid"]["samples"] == 1
    capsys.readouterr()
    assert cli()([*args[:5], str(tmp_path / "o2"), "--source", "wiki", "--language", "xx"]) == 2
    assert "unknown --language 'xx'" in capsys.readouterr().err
    assert cli()([*args[:5], str(tmp_path / "o3"), "--source", "wiki", "--language-field", ""]) == 2
    assert "no language" in capsys.readouterr().err
    assert cli()([*args[:5], str(tmp_path / "o4"), "--source", "bad/name", "--language", "ta"]) == 2
    # another source's settings in the same directory are refused
    assert cli()([*args, "--language", "ta", "--seq-length", "128"]) == 2
    assert "was started with other settings" in capsys.readouterr().err


# --- parallel, resumable, corrupt, S3 ------------------------------------------------------------
def _bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin")) + sorted(out.glob("*.idx"))}


def test_tasks_and_reruns_give_identical_bytes(corpus, expanded_tiny_dir, tmp_path):
    d, _ = corpus
    kw = dict(seq_length=SEQ, valid_fraction=0.3, filters=NO_FILTERS, progress=False)
    one = tmp_path / "one"
    T.build(str(d), expanded_tiny_dir, one, "web", **kw)
    two = tmp_path / "two"
    for i in (1, 0):
        s = T.run_task(str(d), expanded_tiny_dir, two, "web", num_tasks=2, task_index=i, **kw)
        assert s["task_files"] == (2 if i == 0 else 1)
    with pytest.raises(T.TextDataError, match="1 of 3 input files are not done"):
        _merge_with_one_missing(two)
    T.merge(two, progress=False)
    assert _bytes(one) == _bytes(two)
    assert json.loads((one / "manifest.json").read_text())["datasets"] == json.loads((two / "manifest.json").read_text())["datasets"]
    # a rerun skips finished files (their partials stay untouched) and gives the same bytes
    parts = sorted((one / "partials").iterdir())
    mtimes = [(p / "done.json").stat().st_mtime_ns for p in parts]
    shutil.rmtree(parts[1])  # as if the task had been killed before finishing this file
    T.build(str(d), expanded_tiny_dir, one, "web", **kw)
    assert (parts[0] / "done.json").stat().st_mtime_ns == mtimes[0]
    assert _bytes(one) == _bytes(two)


def _merge_with_one_missing(out: Path):
    done = sorted((out / "partials").iterdir())[0]
    hidden = done.with_name(".hidden")
    done.rename(hidden)
    try:
        T.merge(out, progress=False)
    finally:
        hidden.rename(done)


def test_corrupt_file_is_recorded(expanded_tiny_dir, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "good.jsonl", [{"text": " ".join([EN] * 3), "language": "en"}])
    (d / "bad.jsonl").write_text('{"text": "ok", "language": "en"}\n{"text": broken\n')
    m = T.build(str(d), expanded_tiny_dir, tmp_path / "out", "web", valid_fraction=0.0, progress=False)["manifest"]
    assert [b["file"].endswith("bad.jsonl") for b in m["files"]["bad"]] == [True]
    assert m["files"]["bad"][0]["error"].startswith("corrupt")
    assert m["datasets"]["web_en"]["train"]["samples"] == 1


def test_s3_input_matches_local(corpus, expanded_tiny_dir, s3_server, tmp_path, monkeypatch):
    d, _ = corpus
    bucket = s3_server.new_bucket()
    for p in sorted(d.iterdir()):
        s3_server.upload(bucket, p, f"text/{p.name}")
    s3_server.upload(bucket, d / "a_en.jsonl", "elsewhere/a_en.jsonl")
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    kw = dict(seq_length=SEQ, valid_fraction=0.3, filters=NO_FILTERS, progress=False)
    remote = tmp_path / "remote"
    m = T.build(f"s3://{bucket}/text/", expanded_tiny_dir, remote, "web", **kw)["manifest"]
    assert m["files"] == {"total": 3, "bad": []}
    local = tmp_path / "local"
    T.build(str(d), expanded_tiny_dir, local, "web", **kw)
    assert _bytes(remote) == _bytes(local)
    assert not list((remote / "partials").glob("*/input*"))  # the downloaded copies are gone
    assert T.expand_inputs(f"s3://{bucket}/*/a_en.jsonl") == [f"s3://{bucket}/elsewhere/a_en.jsonl", f"s3://{bucket}/text/a_en.jsonl"]


# --- the planner reads text manifests ------------------------------------------------------------
def test_planner_reads_text_manifest(corpus, expanded_tiny_dir, tmp_path):
    d, _ = corpus
    out = tmp_path / "text"
    T.build(str(d), expanded_tiny_dir, out, "web", seq_length=SEQ, valid_fraction=0.3, filters=NO_FILTERS, progress=False)
    cfg = mix.MixConfig(planned_tokens=100_000, shares={"audio": 0.0, "tts": 0.0, "text": 1.0})
    p = mix.plan([out], cfg)
    assert sorted(r.ds.name for r in p.rows) == ["text/web/en", "text/web/hi", "text/web/ta"]
    b = mix.to_blend(p)
    assert sum(b.train_weights) == pytest.approx(1.0)
    assert all(Path(v + ".bin").is_file() for v in b.validation.values())
