#!/usr/bin/env python
"""Benchmark: vocabulary expansion of a full-size Llama-3.2-1B-shaped model on CPU.

Builds a random bf16 model with Llama-3.2-1B's shapes (1.24 B parameters, tied 128,256 x 2,048
embedding) and the real Llama-3 tokenizer in a temporary directory (nothing is downloaded), then
times, each in its own subprocess so the memory peaks do not mix:
  1. speechlm.model.vocab_expansion.expand_vocab (what conversion/expand_vocab.py runs),
  2. transformers' from_pretrained + resize_token_embeddings(193792) + save_pretrained, with the
     default mean_resizing=True (stopped after --baseline-timeout seconds: its 2,048-dim
     MultivariateNormal sampling runs one matrix-vector product per row, ~0.1 s a row on this
     2-core CPU) and with mean_resizing=False (normal init with initializer_range),
  3. AutoTokenizer load of the original and of the expanded tokenizer.
Prints wall time, CPU time and peak RSS (the process's high-water mark, VmHWM) for each.

    .venv/bin/python bench/expand_vocab.py [--workdir DIR] [--keep] [--baseline-timeout S]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Each child prints one JSON line: wall seconds of the measured work, and its peak RSS.
# CPU seconds (user + system) are reported too: on a shared machine they vary less than wall time.
# Peak RSS is VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
_REPORT = (
    "import json, resource; r = resource.getrusage(resource.RUSAGE_SELF); "
    "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]; print('RESULT', json.dumps("
    "{'seconds': time.perf_counter() - t0, 'cpu_seconds': r.ru_utime + r.ru_stime, 'peak_rss_gib': hwm / 2**20}))"
)

CHILDREN = {
    "expand_vocab (ours)": """
import time; t0 = time.perf_counter()
from speechlm.model.vocab_expansion import expand_vocab
s = expand_vocab(SRC, OUT + '-ours')
print(s.format())
""",
    "resize_token_embeddings, mean_resizing=False": """
import time; t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.bfloat16)
print(f'loaded in {time.perf_counter() - t0:.1f} s', flush=True)
m.resize_token_embeddings(193792, mean_resizing=False)
m.save_pretrained(OUT + '-resize-plain')
""",
    "AutoTokenizer load, original": """
import time; t0 = time.perf_counter()
from transformers import AutoTokenizer
t1 = time.perf_counter(); tok = AutoTokenizer.from_pretrained(SRC); print(f'load {time.perf_counter() - t1:.2f} s, {len(tok)} tokens')
""",
    "AutoTokenizer load, expanded": """
import time; t0 = time.perf_counter()
from transformers import AutoTokenizer
t1 = time.perf_counter(); tok = AutoTokenizer.from_pretrained(OUT + '-ours'); print(f'load {time.perf_counter() - t1:.2f} s, {len(tok)} tokens')
""",
    "resize_token_embeddings, mean_resizing=True": """
import time; t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.bfloat16)
print(f'loaded in {time.perf_counter() - t0:.1f} s', flush=True)
m.resize_token_embeddings(193792)  # the default, mean_resizing=True
m.save_pretrained(OUT + '-resize')
""",
}


def make_llama32_1b(out: Path) -> int:
    """A random bf16 Llama-3.2-1B-shaped HF checkpoint written straight to safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from speechlm.demo import tiny

    config = LlamaConfig(
        vocab_size=tiny.LLAMA3_TEXT_VOCAB, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131_072,
        rms_norm_eps=1e-5, rope_parameters={"rope_theta": tiny.LLAMA32_ROPE_THETA, **tiny.LLAMA32_ROPE},
        tie_word_embeddings=True, bos_token_id=tiny.BOS_ID, eos_token_id=tiny.EOS_ID, dtype="bfloat16",
        architectures=["LlamaForCausalLM"],  # AutoBridge (conversion) needs it, as in a real checkpoint
    )
    with torch.device("meta"):  # shapes only; values are filled below without a slow init
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out)
    tiny.write_llama3_tokenizer(out, release="3.2")
    return sum(t.numel() for t in tensors.values())


def _vm_hwm_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_child(code: str, src: Path, out: Path, timeout: float | None = None) -> dict:
    """Run one measurement in a fresh interpreter; stop it after `timeout` seconds."""
    prog = f"SRC, OUT = {str(src)!r}, {str(out)!r}\n{code}\n{_REPORT}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", prog], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hwm = _vm_hwm_gib(proc.pid)
        proc.kill()
        stdout, _ = proc.communicate()
        return {"seconds": float("nan"), "cpu_seconds": float("nan"), "process_seconds": time.perf_counter() - t0, "peak_rss_gib": hwm,
                "log": stdout.strip() + f"\nSTOPPED after {timeout:.0f} s, unfinished (peak RSS so far)"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"child failed:\n{stderr[-3000:]}")
    lines = stdout.strip().splitlines()
    result = json.loads(next(line for line in lines if line.startswith("RESULT"))[7:])
    result["process_seconds"] = wall
    result["log"] = "\n".join(line for line in lines if not line.startswith("RESULT"))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, help="where to build the models (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--baseline-timeout", type=float, default=300, metavar="S",
                   help="stop the mean_resizing=True baseline after S seconds (default 300)")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory(dir=args.workdir, delete=not args.keep)
    src, out = Path(tmp.name) / "llama32-1b-random", Path(tmp.name) / "expanded"
    t0 = time.perf_counter()
    n = make_llama32_1b(src)
    print(f"built a random Llama-3.2-1B-shaped bf16 model: {n / 1e9:.3f} B parameters in {time.perf_counter() - t0:.0f} s ({src})")
    import os

    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'what':44s} {'work s':>7s} {'process s':>9s} {'CPU s':>7s} {'peak RSS GiB':>12s}")
    for name, code in CHILDREN.items():
        r = run_child(code, src, out, timeout=args.baseline_timeout if "mean_resizing=True" in name else None)
        print(f"{name:44s} {r['seconds']:7.1f} {r['process_seconds']:9.1f} {r['cpu_seconds']:7.1f} {r['peak_rss_gib']:12.2f}")
        for line in r["log"].splitlines():
            print(f"    {line}")
        print(f"    (load average now {os.getloadavg()[0]:.1f})", flush=True)
    if args.keep:
        print(f"kept {tmp.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
