"""The CPU mode's allocator setting (speechlm.train.cpu_compat.keep_freed_memory) against glibc's default.

The output layer of the expanded vocabulary dominates a CPU training step of the tiny models:
logits of 193,792 columns, their cross-entropy and gradients. This times that part of a step
(forward, loss, backward) in two fresh processes, one with glibc's default and one after
`keep_freed_memory()`, alternating, and prints both side by side.

    .venv/bin/python bench/cpu_allocator.py [--steps 20] [--rounds 3] [--tokens 128] [--hidden 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_WORKER = """
import json, sys, time
import torch
keep = sys.argv[1] == "keep"
steps, tokens, hidden, vocab = map(int, sys.argv[2:6])
if keep:
    from speechlm.train.cpu_compat import keep_freed_memory
    assert keep_freed_memory(), "mallopt failed"
torch.manual_seed(0)
torch.set_num_threads(1)
weight = torch.nn.Parameter(torch.randn(vocab, hidden) * 0.02)
x = torch.randn(tokens, hidden, requires_grad=True)
target = torch.randint(0, vocab, (tokens,))
times = []
for i in range(steps + 2):  # two warm-up steps
    start = time.perf_counter()
    logits = torch.matmul(x, weight.t())  # as megatron-core's linear layer computes it
    loss = torch.nn.functional.cross_entropy(logits.float(), target)
    loss.backward()
    weight.grad = x.grad = None
    times.append(time.perf_counter() - start)
print(json.dumps({"ms": [t * 1e3 for t in times[2:]]}))
"""


def _run(mode: str, args) -> list[float]:
    proc = subprocess.run([sys.executable, "-c", _WORKER, mode, str(args.steps), str(args.tokens), str(args.hidden),
                           str(args.vocab)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    if proc.returncode != 0:
        sys.exit(f"cpu_allocator: the {mode} worker failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["ms"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per process (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="process pairs, alternating (default 3)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per step (the demo's rank: 128)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (the demo model's: 64)")
    parser.add_argument("--vocab", type=int, default=193_792, help="output rows (the expanded vocabulary)")
    args = parser.parse_args(argv)
    results = {"glibc default": [], "keep_freed_memory": []}
    for r in range(args.rounds):
        results["glibc default"] += _run("default", args)
        results["keep_freed_memory"] += _run("keep", args)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"output layer + cross-entropy + backward, {args.tokens} tokens x {args.hidden} -> {args.vocab:,} rows, "
          f"1 thread; {args.rounds} x {args.steps} steps each")
    print(f"{'allocator':<20} {'median ms/step':>15} {'min':>8} {'max':>8}")
    for name, ms in results.items():
        print(f"{name:<20} {statistics.median(ms):>15.1f} {min(ms):>8.1f} {max(ms):>8.1f}")
    ratio = statistics.median(results["glibc default"]) / statistics.median(results["keep_freed_memory"])
    print(f"speed-up (median default / median keep): {ratio:.2f}x")


if __name__ == "__main__":
    main()
