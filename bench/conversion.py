#!/usr/bin/env python
"""Benchmark: HF <-> Megatron conversion of a full-size Llama-3.2-1B-shaped expanded model on CPU.

Builds a random bf16 model with Llama-3.2-1B's shapes (hidden 2048, 16 layers, 32 heads, 8 KV
heads, intermediate 8192, tied embeddings) and the real Llama-3 tokenizer in a temporary
directory (nothing is downloaded), expands it to 193,792 tokens with speechlm.model.vocab_expansion,
then times, each in its own subprocess so the memory peaks do not mix:
  1. transformers from_pretrained + save_pretrained of the expanded model (the baseline),
  2. speechlm.model.conversion.hf_to_megatron (TP 1, what conversion/hf_to_megatron.py runs),
  3. speechlm.model.conversion.megatron_to_hf to bf16,
  4. the same with --verify (Megatron and HF logits on the fixed batch).
Prints wall time and peak RSS (high-water mark of the process and of any process it started).

    .venv/bin/python bench/conversion.py [--workdir DIR] [--keep] [--no-verify]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Each child prints one JSON line: seconds of the measured work (after interpreter start), and the
# peak RSS of itself and of its children (torch_dist saving may start worker processes).
_REPORT = (
    "import json, resource; print('RESULT', json.dumps({'seconds': time.perf_counter() - t0, "
    "'peak_rss_gib': max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
    "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2**20}))"
)

CHILDREN = {
    "HF load + save (transformers, baseline)": """
import time; t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.bfloat16)
m.save_pretrained(WORK + '/hf-resaved')
""",
    "HF -> Megatron (hf_to_megatron, TP 1)": """
import time; t0 = time.perf_counter()
from speechlm.model.conversion import hf_to_megatron
print(hf_to_megatron(SRC, WORK + '/megatron').format())
""",
    "Megatron -> HF (megatron_to_hf, bf16)": """
import time; t0 = time.perf_counter()
from speechlm.model.conversion import megatron_to_hf
print(megatron_to_hf(WORK + '/megatron', WORK + '/exported').format())
""",
    "Megatron -> HF (megatron_to_hf, bf16, --verify)": """
import time; t0 = time.perf_counter()
from speechlm.model.conversion import megatron_to_hf
print(megatron_to_hf(WORK + '/megatron', WORK + '/exported-verified', verify=True).format())
""",
}


def run_child(code: str, src: Path, work: Path) -> dict:
    prog = f"SRC, WORK = {str(src)!r}, {str(work)!r}\n{code}\n{_REPORT}"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"child failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    lines = r.stdout.strip().splitlines()
    result = json.loads(next(line for line in lines if line.startswith("RESULT"))[7:])
    result["process_seconds"] = wall
    result["log"] = "\n".join(line for line in lines if line.startswith(("converted", "exported", "  token", "  verify", "  ->")))
    return result


def _make_llama32_1b():
    # The same random 1B-shaped model the vocabulary-expansion benchmark builds.
    spec = importlib.util.spec_from_file_location("bench_expand_vocab", REPO / "bench" / "expand_vocab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_llama32_1b


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, help="where to build the models (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--no-verify", action="store_true", help="skip the --verify measurement")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory(dir=args.workdir, delete=not args.keep)
    work = Path(tmp.name)
    base, src = work / "llama32-1b-random", work / "llama32-1b-speech"

    from speechlm.model.vocab_expansion import expand_vocab

    t0 = time.perf_counter()
    n = _make_llama32_1b()(base)
    config = json.loads((base / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]  # as in the real model's config; AutoBridge needs it
    (base / "config.json").write_text(json.dumps(config, indent=2))
    expand_vocab(base, src)
    print(f"built a random Llama-3.2-1B-shaped bf16 model ({n / 1e9:.3f} B parameters before expansion) and "
          f"expanded it to 193,792 tokens in {time.perf_counter() - t0:.0f} s ({src})")
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    print(f"{'what':50s} {'work s':>8s} {'process s':>10s} {'peak RSS GiB':>13s}")
    for name, code in CHILDREN.items():
        if args.no_verify and "verify" in name:
            continue
        r = run_child(code, src, work)
        print(f"{name:50s} {r['seconds']:8.1f} {r['process_seconds']:10.1f} {r['peak_rss_gib']:13.2f}", flush=True)
        for line in r["log"].splitlines():
            print(f"    {line}")
    sizes = {d: sum(f.stat().st_size for f in (work / d).rglob("*") if f.is_file()) / 2**30
             for d in ("llama32-1b-speech", "megatron", "exported")}
    print("sizes on disk: " + ", ".join(f"{d} {s:.2f} GiB" for d, s in sizes.items()))
    if args.keep:
        print(f"kept {tmp.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
