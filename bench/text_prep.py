"""Speed of text data preparation, per core, beside the plain tokenizer on the same text.

Generates jsonl files of long-form documents (English, Hindi, Tamil words drawn at random into
unique lines, ~3,000 characters each) in a temp dir, then times in the same process:
  1. the plain fast tokenizer: `tokenizers.Tokenizer.encode_batch_fast(texts,
     add_special_tokens=False)` in batches of 512 (what the builder calls);
  2. the transformers fast tokenizer: `AutoTokenizer(...)(texts, add_special_tokens=False)`;
  3. the quality filters alone;
  4. the whole build of one task (`text.run_task`: `datasets` streaming read, filters, tokenise,
     format `layout.text_document`s, write partial Megatron datasets), then the merge.
"Per core" divides text tokens (BOS/EOD not counted) by the CPU seconds the process used;
tokenizers' thread pool is held to one thread (RAYON_NUM_THREADS=1).
Run: python bench/text_prep.py [--docs 6000] [--model EXPANDED_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers: one core, for a per-core figure
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

WORDS = {
    "en": "the quick brown fox jumps over lazy dog language models learn from large amounts of text "
          "every morning people in the city walk to work while rivers carry water down to the sea".split(),
    "hi": "भारत एक विशाल देश है यहाँ अनेक भाषाएँ बोली जाती हैं और हर क्षेत्र की अपनी संस्कृति "
          "सुबह लोग काम पर जाते हैं नदियाँ समुद्र तक पानी ले जाती हैं किताबें ज्ञान देती".split(),
    "ta": "தமிழ் உலகின் மிகப் பழமையான மொழிகளில் ஒன்றாகும் இது இந்தியா மற்றும் இலங்கையில் "
          "பேசப்படுகிறது காலையில் மக்கள் வேலைக்கு செல்கிறார்கள் நதிகள் கடலுக்கு நீரை எடுத்துச்".split(),
}


def make_corpus(root: Path, docs: int, per_file: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    langs = list(WORDS)
    texts = []
    for f in range(0, docs, per_file):
        with open(root / f"part-{f // per_file:05d}.jsonl", "w", encoding="utf-8") as out:
            for i in range(f, min(f + per_file, docs)):
                lang = langs[i % 3]
                lines = [" ".join(rng.choice(WORDS[lang], int(rng.integers(8, 20)))) + f" {i}.{j}." for j in range(30)]
                text = "\n".join(lines)
                texts.append(text)
                out.write(json.dumps({"text": text, "language": lang}, ensure_ascii=False) + "\n")
    return texts


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def best(fn, repeat: int):
    runs = [timed(fn) for _ in range(repeat)]
    return min(runs, key=lambda r: r[2])


def model_dir(tmp: Path) -> Path:
    from speechlm.demo import tiny
    from speechlm.model.vocab_expansion import expand_vocab

    return expand_vocab(tiny.make_tiny_llama(tmp / "tiny"), tmp / "tiny-speech").output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=6_000)
    ap.add_argument("--per-file", type=int, default=1_500)
    ap.add_argument("--model", help="expanded model dir (default: a tiny one made here; only its tokenizer matters)")
    ap.add_argument("--repeat", type=int, default=2, help="take the best of this many runs of each loop")
    args = ap.parse_args()

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from speechlm.data import text as T

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model = Path(args.model) if args.model else model_dir(tmp)
        (tmp / "in").mkdir()
        texts = make_corpus(tmp / "in", args.docs, args.per_file)
        chars = sum(len(t) for t in texts)
        print(f"{len(texts)} documents (en/hi/ta), {chars / 1e6:.1f} M characters, "
              f"{len(list((tmp / 'in').iterdir()))} jsonl files; cpu: {os.cpu_count()} cores, "
              f"RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']}")

        tok = Tokenizer.from_file(str(model / "tokenizer.json"))
        tok.encode_special_tokens = True

        def plain():
            n = 0
            for i in range(0, len(texts), 512):
                n += sum(len(e.ids) for e in tok.encode_batch_fast(texts[i:i + 512], add_special_tokens=False))
            return n

        n_tokens, w, c = best(plain, args.repeat)
        rows = [("tokenizers encode_batch_fast (plain)", w, c)]
        hf = AutoTokenizer.from_pretrained(model)

        def hf_call():
            return sum(len(x) for i in range(0, len(texts), 512)
                       for x in hf(texts[i:i + 512], add_special_tokens=False)["input_ids"])

        assert best(hf_call, 1)[0] == n_tokens
        _, w, c = best(hf_call, args.repeat)
        rows.append(("transformers AutoTokenizer __call__", w, c))
        _, w, c = best(lambda: [T.filter_reason(t, T.Filters()) for t in texts], args.repeat)
        rows.append(("quality filters only", w, c))

        def build():
            out = tmp / f"out-{time.monotonic_ns()}"
            s = T.run_task(str(tmp / "in"), model, out, "bench", seq_length=2048, valid_fraction=0.01, progress=False)
            assert not s["failed"]
            return out

        out, w, c = best(build, args.repeat)
        rows.append(("build_text task (read+filter+tokenise+write)", w, c))
        m, mw, mc = timed(lambda: T.merge(out, progress=False))
        written = m["totals"]["tokens"] - 2 * m["totals"]["documents"]
        assert m["samples_read"] == len(texts) and not m["skips"], m["skips"]

        print(f"{n_tokens:,} text tokens ({chars / n_tokens:.2f} chars/token); the build wrote {written:,} "
              f"text tokens in {m['totals']['documents']:,} documents")
        print(f"{'stage':48s} {'wall s':>8s} {'cpu s':>8s} {'text tokens/s per core':>24s}")
        for name, w, c in rows:
            print(f"{name:48s} {w:8.2f} {c:8.2f} {n_tokens / c:24,.0f}")
        print(f"{'merge (' + str(len(list((out / 'partials').iterdir()))) + ' partials)':48s} {mw:8.2f} {mc:8.2f}")
        plain_c, build_c = rows[0][2], rows[3][2]
        print(f"build / plain tokenizer CPU time: {build_c / plain_c:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
