"""Speed of speech data preparation on local shards, per core.

Generates WebDataset shards (codes.npy + json, ~1,250 codes per segment by default) in a temp
dir, then times on the same shards in the same process:
  1. webdataset: a plain `wds.WebDataset(...).decode()` loop touching codes and json (the
     issue's reference: ~7,600 segments/s on one quiet core);
  2. our tar reader alone (`speechlm.data.shards.iter_samples`);
  3. reader + npy/json parsing + validation (no documents);
  4. the whole build of one task (`run_task`: validate, format documents with the token layout,
     write partial Megatron datasets) and the merge.
"Per core" divides by the CPU seconds the process used (time.process_time), so a busy machine
shows up as wall time, not as a lower rate. Run: python bench/speech_prep.py [--segments 20000]
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

import numpy as np


def make_shards(root: Path, segments: int, per_shard: int, mean_codes: int, dtype: str, seed: int = 0,
                mixed: bool = False) -> list[str]:
    """Shards of random segments: one language per shard (how speech corpora usually come), or
    all 12 languages mixed in every shard (24 output prefixes per shard instead of 2)."""
    import webdataset as wds

    from speechlm.token_layout import LANGUAGES

    rng = np.random.default_rng(seed)
    paths = []
    words = ["namaste", "duniya", "speech", "token", "model", "data", "bharat", "hello"]
    for s in range(0, segments, per_shard):
        path = root / f"shard-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as tw:
            for i in range(s, min(s + per_shard, segments)):
                n = int(rng.integers(mean_codes // 2, mean_codes * 3 // 2 + 1))
                codes = rng.integers(0, 65536, n).astype(dtype)
                text = " ".join(rng.choice(words, int(rng.integers(5, 25))))
                lang = LANGUAGES[(i if mixed else i // per_shard) % len(LANGUAGES)]
                meta = {"text": text, "language": lang, "duration": n / 50}
                tw.write({"__key__": f"seg{i:08d}", "codes.npy": codes, "json": meta})
        paths.append(str(path))
    return paths


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segments", type=int, default=20_000)
    ap.add_argument("--per-shard", type=int, default=2_000)
    ap.add_argument("--mean-codes", type=int, default=1_250)
    ap.add_argument("--dtype", default="int32", help="dtype of codes.npy in the generated shards")
    ap.add_argument("--mixed", action="store_true", help="every language in every shard (default: one per shard)")
    ap.add_argument("--kind", choices=("audio", "tts"), default="audio")
    ap.add_argument("--model", help="expanded model dir (needed for --kind tts; audio uses a bare layout)")
    ap.add_argument("--repeat", type=int, default=2, help="take the best of this many runs of each loop")
    args = ap.parse_args()

    import webdataset as wds

    from speechlm.data import speech, speech_samples
    from speechlm.data.model_dir import load_model_dir
    from speechlm.data.shards import iter_samples
    from speechlm.token_layout import TokenLayout

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "shards").mkdir()
        _, gen_s, _ = timed(lambda: make_shards(tmp / "shards", args.segments, args.per_shard, args.mean_codes, args.dtype,
                                                 mixed=args.mixed))
        shards = sorted(str(p) for p in (tmp / "shards").glob("*.tar"))
        size = sum(os.path.getsize(p) for p in shards)
        print(f"{args.segments} segments, ~{args.mean_codes} {args.dtype} codes each, {len(shards)} shards "
              f"({'all languages in each' if args.mixed else 'one language each'}), "
              f"{size / 2**20:.0f} MiB (generated in {gen_s:.1f} s)")
        model = args.model
        if model is None:
            if args.kind == "tts":
                sys.exit("--kind tts needs --model (an expanded model dir with tokenizer.json)")
            model = str(tmp / "layout")
            Path(model).mkdir()
            TokenLayout().save(model)

        def wds_loop():
            n = 0
            for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode():
                n += len(s["codes.npy"]) > 0 and len(s["json"]) > 0
            return n

        def reader_loop():
            n = 0
            for url in shards:
                with open(url, "rb", buffering=0) as f:
                    for _key, fields in iter_samples(f):
                        n += len(fields) > 0
            return n

        def parse_loop():
            n = 0
            for url in shards:
                with open(url, "rb", buffering=0) as f:
                    for _key, fields in iter_samples(f):
                        codes = speech_samples.parse_npy(fields["codes.npy"])
                        meta = json.loads(fields["json"])
                        n += speech_samples.codes_problem(codes) is None and meta["language"] is not None
            return n

        runs = {}
        for name, fn in (("webdataset .decode() loop", wds_loop), ("our tar reader", reader_loop),
                         ("reader + npy/json + checks", parse_loop)):
            best = None
            for _ in range(args.repeat):
                n, wall, cpu = timed(fn)
                assert n == args.segments, (name, n)
                best = (wall, cpu) if best is None or cpu < best[1] else best
            runs[name] = best

        best = None
        for r in range(args.repeat):
            out = tmp / f"out{r}"
            summary, wall, cpu = timed(lambda: speech.run_task(shards, model, out, args.kind, progress=False))
            assert not summary["failed"], summary["failed"]
            best = (wall, cpu, out) if best is None or cpu < best[1] else best
        wall, cpu, out = best
        runs[f"build_speech task ({args.kind}: validate, format, write)"] = (wall, cpu)
        # fixed cost of a task, not per segment: layout + tokenizer check and load (tts)
        _, lwall, lcpu = timed(lambda: load_model_dir(model, need_tokenizer=args.kind == "tts"))
        runs["  same, without loading the model dir"] = (wall - lwall, cpu - lcpu)
        manifest, mwall, mcpu = timed(lambda: speech.merge(out, progress=False))
        tokens = manifest["totals"]["tokens"]
        assert manifest["totals"]["samples"] == args.segments

        print(f"\n{'loop':<52} {'segments/s/core':>16} {'wall s':>8} {'cpu s':>8}")
        base = runs["webdataset .decode() loop"][1]
        for name, (w, c) in runs.items():
            print(f"{name:<52} {args.segments / c:>16,.0f} {w:>8.2f} {c:>8.2f}   x{base / c:.2f} vs webdataset")
        print(f"\nmodel dir load: {lcpu:.2f} s cpu once per task")
        print(f"build: {tokens / cpu:,.0f} tokens/s/core ({tokens:,} tokens, "
              f"{manifest['totals']['documents']:,} documents)")
        print(f"merge: {mwall:.2f} s wall for {len(shards)} shards; build + merge "
              f"{args.segments / (cpu + mcpu):,.0f} segments/s/core")


if __name__ == "__main__":
    main()
