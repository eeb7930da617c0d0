"""The README's main command on the embedded default: tiny model, synthetic speech, CPU.

    python -m speechlm.demo [--workdir runs/demo] [--iters N]

What it runs today (every stage is the project's own production code path):
  1. a tiny random Llama-3.2-architecture model with the real Llama-3 tokenizer,
  2. vocabulary expansion to the speech vocabulary (conversion/expand_vocab.py),
  3. a synthetic "codec" dataset (each word has a fixed run of codes) written as a Megatron
     indexed dataset of audio-only documents in the token layout's format,
  4. Megatron-Bridge pretraining on 2 processes (recipes/smoke.yaml), with validation and a
     torch_dist checkpoint,
and prints the training/validation losses. Stages already built are reused on a re-run.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from speechlm import tiny
from speechlm.blend_file import Blend
from speechlm.token_layout import TokenLayout

REPO = Path(__file__).resolve().parent.parent


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def synthetic_speech_dataset(prefix: Path, layout: TokenLayout, n_docs: int = 2000, seed: int = 0) -> None:
    """Audio-only documents of a learnable synthetic codec: 40 'words', each a fixed run of
    3-6 codes; an utterance is 3-8 words. The model can only lower its loss by learning the runs."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    words = [np.random.default_rng(0).integers(0, 65_536, size=int(n)) for n in np.random.default_rng(1).integers(3, 7, 40)]
    rng = np.random.default_rng(seed)  # the same words for every split; utterances differ by seed
    tmp = prefix.with_name(prefix.name + ".partial")
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=np.int32)
    for _ in range(n_docs):
        codes = np.concatenate([words[i] for i in rng.integers(0, len(words), size=int(rng.integers(3, 9)))])
        doc = layout.audio_document(codes)
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{tmp}.idx")
    for ext in (".bin", ".idx"):  # .idx last: a prefix with an .idx is complete
        Path(f"{tmp}{ext}").rename(f"{prefix}{ext}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m speechlm.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(REPO / "runs" / "demo"), help="where every stage writes (default: runs/demo)")
    parser.add_argument("--iters", type=int, default=40, help="pretraining iterations (default 40)")
    args = parser.parse_args(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    base, expanded = work / "tiny-llama32", work / "tiny-llama32-speech"
    step(f"1/4 tiny Llama-3.2 model -> {base}")
    if not (base / "config.json").is_file():
        tiny.make_tiny_llama(base)
    step(f"2/4 vocabulary expansion -> {expanded}")
    if not (expanded / "token_layout.json").is_file():
        subprocess.run([sys.executable, str(REPO / "conversion" / "expand_vocab.py"), "--input", str(base),
                        "--output", str(expanded)], check=True)
    layout = TokenLayout.load(expanded)

    data = work / "data"
    train, valid, blend = data / "audio_synthetic_train", data / "audio_synthetic_valid", data / "blend.yaml"
    step(f"3/4 synthetic speech dataset -> {data}")
    if not blend.is_file():
        data.mkdir(parents=True, exist_ok=True)
        synthetic_speech_dataset(train, layout, n_docs=2000, seed=0)
        synthetic_speech_dataset(valid, layout, n_docs=100, seed=1)
        Blend(layout_hash=layout.layout_hash, train_prefixes=[str(train)], train_weights=[1.0],
              validation={"audio/synthetic": str(valid)}).write(blend)

    ckpt = work / "checkpoints"
    step(f"4/4 Megatron-Bridge pretraining on 2 processes -> {ckpt}")
    log = work / "pretrain.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "speechlm.train", "--config", str(REPO / "recipes" / "smoke.yaml"),
           f"speechlm.hf_model={expanded}", f"speechlm.blend={blend}", f"checkpoint.save={ckpt}",
           f"train.train_iters={args.iters}", "validation.eval_interval=20"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            out.write(line)
            if m := re.search(r"iteration\s+(\d+)/\s*(\d+).*?per iteration \(ms\): ([0-9.]+).*?lm loss: ([0-9.E+-]+)", line):
                print(f"  iteration {m[1]}/{m[2]}  loss {float(m[4]):.3f}  ({float(m[3]):.0f} ms)", flush=True)
            elif re.search(r"validation .*at iteration|saved checkpoint", line):
                print("  " + line.strip(), flush=True)
    if proc.wait() != 0:
        sys.exit(f"pretraining failed (exit {proc.returncode}); full log: {log}")
    losses = [float(v) for v in re.findall(r"\| lm loss: ([0-9.E+-]+)", log.read_text())]
    print(f"\ndone in {time.time() - started:.0f}s: training loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
          f"checkpoints in {ckpt}, log in {log}")


if __name__ == "__main__":
    main()
