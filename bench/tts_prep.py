"""Speed of TTS data preparation (build_speech --kind tts), per core, on the same shards in one run.

Generates WebDataset shards of TTS pairs (codes.npy + json; ~500 int32 codes, 250..750, and an
8-25-word transcript; Hindi, Tamil and English shards in turn, one language per shard, words
drawn Zipf-like from a 20,000-word synthetic vocabulary per language with some punctuation and
digits), then times on the same shards:
  1. webdataset: a plain `wds.WebDataset(...).decode()` loop touching codes and json (the
     reference loop of issue 19);
  2. the build task (`speech.run_task`, validate, tokenize, format, write partials) with the
     Hugging Face tokenizer forced (SPEECHLM_TEXT_TOKENIZER=hf: the tokenizer data prep used
     before the fast path);
  3. the same build with the default tokenizer (the tiktoken fast path where proven);
  4. with --old-checkout DIR: the build task of another checkout of this repository (e.g. the
     commit before a change: `mkdir /tmp/old && git archive <commit> | tar -x -C /tmp/old`).
Each build runs in its own fresh child process on the same shards (so none inherits another's
heap), timed inside the child (time.process_time).
Each build's rate is given in steady state (the once-per-task model dir load, measured on its
own, subtracted) and with the load. The HF and fast builds' partials are compared byte for byte.
"Per core" divides by the CPU seconds used (time.process_time), so a busy machine shows up as
wall time rather than as a lower rate; the ratio to the webdataset loop is the steadier number.

Run: python bench/tts_prep.py [--segments 200000] [--model EXPANDED_DIR] [--old-checkout DIR]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # HF tokenizers: one core, for a per-core figure
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Syllables per script: consonant + vowel sign combinations make plausible words.
_SCRIPTS = {
    "hi": ("कखगघचछजझटडतथदधनपफबभमयरलवशसह", ["", "ा", "ि", "ी", "ु", "ू", "े", "ै", "ो", "ौ", "ं", "्"]),
    "ta": ("கஙசஞடணதநபமயரலவழளறன", ["", "ா", "ி", "ீ", "ு", "ூ", "ெ", "ே", "ை", "ொ", "ோ", "்"]),
    "en": ("bcdfghjklmnprstvwyz", ["a", "e", "i", "o", "u", "ee", "ou", "ar", "er", "in"]),
}
_PUNCT = {"hi": ["", "", "", ",", "।", "?"], "ta": ["", "", "", ",", ".", "?"], "en": ["", "", "", ",", ".", "?"]}


def vocabulary(lang: str, n: int, rng: np.random.Generator) -> list[str]:
    cons, vowels = _SCRIPTS[lang]
    words: set[str] = set()
    while len(words) < n:
        k = int(rng.integers(1, 5))
        w = "".join(cons[int(rng.integers(len(cons)))] + vowels[int(rng.integers(len(vowels)))] for _ in range(k))
        words.add(w.capitalize() if lang == "en" and rng.random() < 0.1 else w)
    return sorted(words)


def transcripts(lang: str, count: int, rng: np.random.Generator, vocab: list[str]) -> list[str]:
    """8-25 words each, Zipf-distributed (rank^-1.1) over the vocabulary; some punctuation, digits."""
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    p /= p.sum()
    out = []
    lengths = rng.integers(8, 26, count)
    picks = rng.choice(len(vocab), int(lengths.sum()), p=p)
    o = 0
    for n in lengths:
        ws = [vocab[i] for i in picks[o : o + n]]
        o += n
        if rng.random() < 0.1:
            ws[int(rng.integers(n))] = str(int(rng.integers(1, 2030)))
        ws[-1] += _PUNCT[lang][int(rng.integers(len(_PUNCT[lang])))]
        if rng.random() < 0.2:
            ws[int(rng.integers(n - 1))] += ","
        out.append(" ".join(ws))
    return out


def make_shards(root: Path, segments: int, per_shard: int, mean_codes: int, langs: list[str], seed: int = 0) -> list[str]:
    import webdataset as wds

    rng = np.random.default_rng(seed)
    vocabs = {lang: vocabulary(lang, 20_000, rng) for lang in langs}
    paths = []
    for s in range(0, segments, per_shard):
        n_here = min(per_shard, segments - s)
        lang = langs[(s // per_shard) % len(langs)]
        texts = transcripts(lang, n_here, rng, vocabs[lang])
        path = root / f"shard-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as tw:
            for j, text in enumerate(texts):
                n = int(rng.integers(mean_codes // 2, mean_codes * 3 // 2 + 1))
                codes = rng.integers(0, 65536, n).astype(np.int32)
                tw.write({"__key__": f"seg{s + j:08d}", "codes.npy": codes,
                          "json": {"text": text, "language": lang, "duration": n / 50}})
        paths.append(str(path))
    return paths


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def tiny_model(tmp: Path) -> Path:
    from speechlm.demo import tiny
    from speechlm.model.vocab_expansion import expand_vocab

    return expand_vocab(tiny.make_tiny_llama(tmp / "tiny", num_layers=1), tmp / "tiny-speech").output


_CHILD = """
import sys, time
from speechlm.data import speech
from speechlm.data.model_dir import load_model_dir
shards, model, out = sys.argv[1].split("\\n"), sys.argv[2], sys.argv[3]
load_model_dir(model, need_tokenizer=True)  # imports; the second load is what run_task pays
c0 = time.process_time()
load_model_dir(model, need_tokenizer=True)
c1 = time.process_time()
s = speech.run_task(shards, model, out, "tts", progress=False)
c2 = time.process_time()
assert not s["failed"], s["failed"]
print(c1 - c0, c2 - c1)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segments", type=int, default=200_000)
    ap.add_argument("--per-shard", type=int, default=2_000)
    ap.add_argument("--mean-codes", type=int, default=500)
    ap.add_argument("--languages", default="hi,ta,en", help="one language per shard, in turn")
    ap.add_argument("--model", help="expanded model dir (default: a tiny one made here; only its tokenizer matters)")
    ap.add_argument("--old-checkout", help="another checkout of this repo: also time its build task (child process)")
    ap.add_argument("--repeat", type=int, default=1, help="take the best of this many runs of each loop")
    args = ap.parse_args()

    import webdataset as wds

    from speechlm.data import fast_tokenizer

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model = Path(args.model) if args.model else tiny_model(tmp)
        (tmp / "shards").mkdir()
        _, gen_s, _ = timed(lambda: make_shards(tmp / "shards", args.segments, args.per_shard, args.mean_codes,
                                                 args.languages.split(",")))
        shards = sorted(str(p) for p in (tmp / "shards").glob("*.tar"))
        size = sum(os.path.getsize(p) for p in shards)
        print(f"{args.segments:,} TTS segments, ~{args.mean_codes} int32 codes and 8-25 words ({args.languages}) each, "
              f"{len(shards)} shards, {size / 2**20:.0f} MiB (generated in {gen_s:.1f} s); "
              f"cpu: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")

        def wds_loop():
            n = 0
            for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode():
                n += len(s["codes.npy"]) > 0 and len(s["json"]) > 0
            return n

        rows: list[tuple[str, float, float | None]] = []  # name, cpu s (steady), load cpu s
        best = min((timed(wds_loop) for _ in range(args.repeat)), key=lambda r: r[2])
        assert best[0] == args.segments
        rows.append(("webdataset .decode() loop", best[2], None))

        outs = {}
        builds = [("build task, HF tokenizer (forced)", "hf", REPO), ("build task, fast path (default)", "auto", REPO)]
        if args.old_checkout:
            builds.append((f"build task, {Path(args.old_checkout).name}", "old", Path(args.old_checkout)))
        for label, mode, checkout in builds:  # each in a fresh child process: same conditions for all
            env = {**os.environ, "PYTHONPATH": str(checkout), fast_tokenizer.ENV: "auto" if mode == "old" else mode}
            run = []
            for r in range(args.repeat):
                out = tmp / f"out-{mode}-{r}"
                proc = subprocess.run([sys.executable, "-c", _CHILD, "\n".join(shards), str(model), str(out)],
                                      cwd=checkout, capture_output=True, text=True, env=env)
                if proc.returncode:
                    sys.exit(f"{label} failed:\n{proc.stderr[-3000:]}")
                load_c, task_c = map(float, proc.stdout.split()[-2:])
                run.append((task_c - load_c, load_c, out))
            c, load_c, outs[mode] = min(run)
            rows.append((label, c, load_c))

        same = []
        for mode in [m for m in outs if m != "hf"]:
            a, b = outs["hf"] / "partials", outs[mode] / "partials"
            files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.suffix in (".bin", ".idx"))
            match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
            same.append(f"{mode}: {len(match)}/{len(files)} .bin/.idx identical to the HF build"
                        + (f" (DIFFER: {mismatch[:3]} {errors[:3]})" if mismatch or errors else ""))

        base = rows[0][1]
        print(f"\n{'loop':<44} {'segments/s/core':>16} {'with load':>10} {'load s':>7} {'vs webdataset':>14}")
        for name, c, load_c in rows:
            with_load = f"{args.segments / (c + load_c):,.0f}" if load_c is not None else ""
            load_s = f"{load_c:.2f}" if load_c is not None else ""
            print(f"{name:<44} {args.segments / c:>16,.0f} {with_load:>10} {load_s:>7} {base / c:>13.2f}x")
        for line in same:
            print(line)


if __name__ == "__main__":
    main()
