"""The README's main command: the whole pipeline, for real, at toy size on CPU.

    python -m speechlm.demo [--workdir runs/demo] [--s3]

Every stage is a command of this repository run as on a cluster (same entry points, same code
paths); only the sizes are tiny. Under --workdir:
  1  base/          a random Llama-3.2-architecture model (hidden 64, 4 layers) + the real Llama-3 tokenizer
  2  expanded/      conversion/expand_vocab.py: + 65,536 codec tokens (193,792 rows)
  3  ckpt/base/     conversion/hf_to_megatron.py
  4  raw/           a synthetic learnable codec (speechlm.demo.synthetic_codec) as WebDataset shards:
                    TTS pairs and unpaired speech of 4 speakers, a text corpus, held-out sentences
                    (--s3: served to the next stage from a local S3 endpoint)
  5  data/          data_prep/build_speech.py (tts, audio) and data_prep/build_text.py
  6  data/blend.yaml  data_prep/plan_mix.py with recipes/data/demo_mix.yaml
  7  ckpt/pretrain/ speechlm.train on 2 processes, recipes/demo_pretrain.yaml
  8  ckpt/sft/      speechlm.train (SFT), recipes/demo_sft.yaml; beside it, python -m speechlm.evaluate
                    --watch evaluates each SFT checkpoint as it lands (stage 11)
  9  export/        conversion/megatron_to_hf.py --verify
  10 synth/         python -m speechlm.synthesize on the held-out sentences (greedy), half of them
                    cloning a reference utterance's voice (--prompt-codes)
  11 eval/          the checkpoint evaluation started in stage 8 finishes: every SFT checkpoint
                    spoke the held-out set; CER/WER per language with the synthetic ASR (the codec
                    read back), speaker similarity with the synthetic speakers; the best pinned
  12 report.md / report.json: losses, validation loss per set, content and cloning accuracy per
                    language (the generated codes read back with the codec), CER per checkpoint and
                    language and the pinned choice; exit 1 below 90 %

Full logs of each stage are in <workdir>/logs/. A re-run reuses every finished stage (training
resumes from its last checkpoint); delete a stage's directory to redo it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from speechlm import atomic
from speechlm.demo import synthetic_codec, tiny

REPO = Path(__file__).resolve().parents[2]
# The demo's data sizes (training settings live in recipes/demo_*.yaml).
DATA_SIZES = dict(tts_per_language=3000, audio_per_language=1000, text_paragraphs_per_language=60,
                  heldout_per_language=40)
MODEL = dict(hidden_size=64, num_layers=4)  # layers are cheap next to the 193,792-row output layer
SEQ_LENGTH = 128  # = recipes/demo_*.yaml dataset.seq_length
ACCURACY_GOAL = 0.90
STAGES = 12
TRAIN_LINE = re.compile(r"iteration\s+(\d+)/\s*(\d+).*?per iteration \(ms\): ([0-9.]+).*?lm loss: ([0-9.E+-]+)")


class StopDemo(Exception):
    """--stop-after reached."""


class Demo:
    def __init__(self, work: Path, stop_after: int = STAGES):
        self.work, self.stop_after = work, stop_after
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.started = time.time()
        self.n = 0
        self.background: list[subprocess.Popen] = []  # stopped when the demo ends, however it ends

    def stage(self, title: str, output: Path, done: bool) -> bool:
        """Print the stage header; True when the stage must run."""
        self.n += 1
        if self.n > self.stop_after:
            raise StopDemo
        state = "reused" if done else "running"
        print(f"\n=== {self.n}/{STAGES} {title} -> {output.relative_to(self.work) if output.is_relative_to(self.work) else output}"
              f"  [{state}, {time.time() - self.started:.0f}s]", flush=True)
        return not done

    def run(self, name: str, cmd: list[str], show=lambda line: False) -> Path:
        """Run one command of the repository; its whole output goes to logs/<name>.log, the lines
        `show` accepts (or rewrites, when it returns a string) to the terminal."""
        log = self.logs / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                out.write(line)
                shown = show(line)
                if shown:
                    print("  " + (shown if isinstance(shown, str) else line.rstrip()), flush=True)
        self.check(name, proc.wait(), log)
        return log

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        """Start a command in the background (output to logs/<name>.log); `wait` for it later."""
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, text=True)
        log.close()  # the child holds its own copy
        self.background.append(proc)
        return proc

    def wait(self, name: str, proc: subprocess.Popen) -> Path:
        self.check(name, proc.wait(), self.logs / f"{name}.log")
        return self.logs / f"{name}.log"

    def check(self, name: str, returncode: int, log: Path) -> None:
        if returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
            sys.exit(f"{tail}\nstage {name} failed (exit {returncode}); full log: {log}")


def training_line(line: str) -> str | bool:
    if m := TRAIN_LINE.search(line):
        it, total = int(m[1]), int(m[2])
        if it == 1 or it % 10 == 0 or it == total:
            return f"iteration {it}/{total}  loss {float(m[4]):.3f}  ({float(m[3]):.0f} ms/it)"
        return False
    return bool(re.search(r"validation .*at iteration|saved checkpoint", line))


def evaluation_done(evaluation: Path, sft: Path) -> bool:
    """Every SFT checkpoint evaluated (the evaluator's table lists each)."""
    from speechlm.train.checkpoints import saved_iterations

    table = evaluation / "table.json"
    if not table.is_file():
        return False
    steps = {c["step"] for c in json.loads(table.read_text())["checkpoints"]}
    return set(saved_iterations(sft)) <= steps


def finished_iterations(ckpt: Path) -> int:
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    return int(tracker.read_text().strip()) if tracker.is_file() else 0


def recipe_iters(recipe: str) -> int:
    from speechlm.train.recipe import load_recipe

    return int(load_recipe(REPO / "recipes" / recipe).train.train_iters)


def serve_from_s3(raw: Path, stack: ExitStack, env: dict) -> str:
    """Upload raw/ to a bucket of a local S3 endpoint (moto) for this run; returns s3://bucket."""
    from moto.server import ThreadedMotoServer

    import boto3

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    stack.callback(server.stop)
    host, port = server.get_host_and_port()
    # What a user sets for R2 (dummy keys: moto checks none).
    env.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="demo", AWS_SECRET_ACCESS_KEY="demo",
               AWS_DEFAULT_REGION="us-east-1")
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="demo", aws_secret_access_key="demo")
    client.create_bucket(Bucket="demo")
    for path in sorted(raw.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), "demo", path.relative_to(raw).as_posix())
    print(f"  serving {raw} as s3://demo/ from {env['AWS_ENDPOINT_URL']}", flush=True)
    return "s3://demo"


def read_losses(log: Path) -> dict:
    text = log.read_text()
    train = [float(m[4]) for m in TRAIN_LINE.finditer(text)]
    valid: dict[str, float] = {}
    for name, loss in re.findall(r"validation (\S+) at iteration \d+ \| lm loss: ([0-9.E+-]+)", text):
        valid[name] = float(loss)  # the last evaluation wins
    return {"train_first": train[0] if train else None, "train_last": train[-1] if train else None, "validation": valid}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speechlm.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(REPO / "runs" / "demo"), help="where every stage writes (default: runs/demo)")
    parser.add_argument("--s3", action="store_true", help="read the raw shards through a local S3 endpoint (moto)")
    parser.add_argument("--stop-after", type=int, default=STAGES, metavar="N", choices=range(1, STAGES + 1),
                        help=f"stop after stage N (1-{STAGES}; e.g. 6: data and mixture only)")
    args = parser.parse_args(argv)
    work = Path(args.workdir).resolve()
    demo = Demo(work, args.stop_after)
    try:
        return run_pipeline(demo, args)
    except StopDemo:
        print(f"\nstopped after stage {args.stop_after} (--stop-after) in {time.time() - demo.started:.0f}s", flush=True)
        return 0
    finally:
        for proc in demo.background:  # a failed stage or --stop-after: the evaluation resumes next time
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_pipeline(demo: Demo, args: argparse.Namespace) -> int:
    work = demo.work
    py = sys.executable
    print(f"speechlm demo in {work} (logs in {demo.logs})", flush=True)

    base, expanded = work / "base", work / "expanded"
    if demo.stage("tiny Llama-3.2 model with the real Llama-3 tokenizer", base, (base / "config.json").is_file()):
        # A fixed temporary name (.base.partial): a rerun replaces what a killed run left.
        with atomic.atomic_path(base, directory=True, per_process=False) as tmp:
            tiny.make_tiny_llama(tmp, **MODEL)
    if demo.stage("vocabulary expansion", expanded, (expanded / "token_layout.json").is_file()):
        demo.run("expand_vocab", [py, "conversion/expand_vocab.py", "--input", str(base), "--output", str(expanded)],
                 show=lambda line: "rows" in line or "wrote" in line.lower())

    base_ckpt = work / "ckpt" / "base"
    if demo.stage("HF -> Megatron", base_ckpt, base_ckpt.is_dir()):
        demo.run("hf_to_megatron", [py, "conversion/hf_to_megatron.py", "--input", str(expanded), "--output", str(base_ckpt)])

    raw = work / "raw"
    if demo.stage("synthetic codec data (WebDataset shards, text corpus, held-out sentences)", raw, (raw / "done.json").is_file()):
        counts = synthetic_codec.write_dataset(synthetic_codec.SyntheticCodec(), raw, **DATA_SIZES)
        print("  " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)

    data = work / "data"
    builds = {"tts": data / "tts", "audio": data / "audio", "text": data / "text"}
    with ExitStack() as stack:
        if demo.stage("speech and text data prep", data, all((d / "manifest.json").is_file() for d in builds.values())):
            source = serve_from_s3(raw, stack, demo.env) if args.s3 else str(raw)
            for kind in ("tts", "audio"):
                n = len(list((raw / kind).glob("shard-*.tar")))
                spec = f"{source}/{kind}/shard-{{000000..{n - 1:06d}}}.tar"
                demo.run(f"build_{kind}", [py, "data_prep/build_speech.py", "--input", spec, "--model", str(expanded),
                                           "--output", str(builds[kind]), "--kind", kind, "--seq-length", str(SEQ_LENGTH),
                                           "--valid-fraction", "0.02"],
                         show=lambda line: "wrote" in line or "skipped" in line)
            demo.run("build_text", [py, "data_prep/build_text.py", "--input", f"{source}/text/corpus.jsonl",
                                    "--model", str(expanded), "--output", str(builds["text"]), "--source", "synthetic",
                                    "--seq-length", str(SEQ_LENGTH), "--valid-fraction", "0.05"],
                     show=lambda line: "wrote" in line or "skipped" in line)

    blend = data / "blend.yaml"
    if demo.stage("mixture plan", blend, blend.is_file()):
        demo.run("plan_mix", [py, "data_prep/plan_mix.py", "--manifests", *map(str, builds.values()),
                              "--config", "recipes/data/demo_mix.yaml", "--output", str(blend)],
                 show=lambda line: line.startswith("|") or "epochs" in line)

    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "speechlm.train"]
    pt, sft = work / "ckpt" / "pretrain", work / "ckpt" / "sft"
    if demo.stage("pretraining (Megatron-Bridge, 2 processes)", pt, finished_iterations(pt) >= recipe_iters("demo_pretrain.yaml")):
        demo.run("pretrain", torchrun + ["--config", "recipes/demo_pretrain.yaml", f"speechlm.hf_model={expanded}",
                                         f"speechlm.blend={blend}", f"checkpoint.save={pt}",
                                         f"checkpoint.pretrained_checkpoint={base_ckpt}"], show=training_line)
    evaluation, watcher = work / "eval", None
    evaluate = [py, "-m", "speechlm.evaluate", "--watch", str(sft), "--eval-set", str(raw / "heldout.jsonl"),
                "--out", str(evaluation), "--asr", "synthetic", "--speaker-model", "synthetic",
                "--pin-best", "1", "--metric", "cer", "--poll-seconds", "5"]
    if demo.stage("SFT (text-to-speech pairs), each checkpoint evaluated beside it", sft,
                  finished_iterations(sft) >= recipe_iters("demo_sft.yaml")):
        watcher = demo.start("evaluate", evaluate)  # waits for checkpoints; stage 11 waits for it
        demo.run("sft", torchrun + ["--config", "recipes/demo_sft.yaml", f"speechlm.hf_model={expanded}",
                                    f"speechlm.blend={blend}", f"checkpoint.save={sft}",
                                    f"checkpoint.pretrained_checkpoint={pt}"], show=training_line)

    export = work / "export"
    if demo.stage("Megatron -> HF export", export, (export / "config.json").is_file()):
        demo.run("megatron_to_hf", [py, "conversion/megatron_to_hf.py", "--input", str(sft), "--output", str(export),
                                    "--dtype", "fp32", "--verify"], show=lambda line: "verif" in line.lower())

    synth = work / "synth"
    demo.stage("speak the held-out sentences, half of them in a reference's voice (greedy)", synth, False)
    demo.run("synthesize", [py, "-m", "speechlm.synthesize", "--model", str(export), "--batch", str(raw / "heldout.jsonl"),
                            "--out", str(synth), "--temperature", "0"], show=lambda line: line.startswith(("total", "resuming")))

    if watcher is not None:
        demo.stage("checkpoint evaluation (started beside SFT: synthetic ASR and speakers)", evaluation, False)
        print("  waiting for the evaluation of the last SFT checkpoint", flush=True)
        demo.wait("evaluate", watcher)
    elif demo.stage("checkpoint evaluation (synthetic ASR and speakers)", evaluation, evaluation_done(evaluation, sft)):
        demo.run("evaluate", evaluate)

    demo.stage("report", work / "report.md", False)
    report = make_report(work, raw, synth)
    print(report["markdown"], flush=True)
    print(f"done in {time.time() - demo.started:.0f}s; report: {work / 'report.md'}", flush=True)
    return 0 if goals_met(report) else 1


def make_report(work: Path, raw: Path, synth: Path) -> dict:
    import numpy as np

    codec = synthetic_codec.SyntheticCodec()  # the codec stage 4 wrote raw/ with (deterministic)
    answers = json.loads((raw / "heldout_answers.json").read_text())
    generated = {k: np.load(synth / f"{k}.npy").tolist() for k in answers if (synth / f"{k}.npy").is_file()}
    overall = synthetic_codec.speech_scores(codec, answers, generated)
    by_language = {lang: synthetic_codec.speech_scores(codec, {k: a for k, a in answers.items() if a["language"] == lang},
                                                       generated)
                   for lang in sorted({a["language"] for a in answers.values()})}
    losses = {name: read_losses(work / "logs" / f"{name}.log") for name in ("pretrain", "sft")
              if (work / "logs" / f"{name}.log").is_file()}
    lines = ["# speechlm demo report", "",
             f"Held-out sentences: {overall['items'] - overall['cloning_items']} to speak and "
             f"{overall['cloning_items']} to speak in the voice of a reference utterance (new combinations of "
             f"known words; {codec.speakers} speakers; chance per code 1/65,536, per voice 1/{codec.speakers}). "
             "The generated codes are read back word by word with the codec.", "",
             f"**Content accuracy: {overall['content_accuracy']:.1%}** (the right words, in any voice; goal "
             f"{ACCURACY_GOAL:.0%}); **cloning accuracy: {overall['cloning_accuracy']:.1%}** (the right words in the "
             f"reference's voice; goal {ACCURACY_GOAL:.0%}); items exactly right: {overall['exact_items']:.1%}", "",
             "| language | content accuracy | cloning accuracy | exact (all) | exact (cloning) | one voice (no reference) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {lang} | {r['content_accuracy']:.1%} | {r['cloning_accuracy']:.1%} | {r['exact_items']:.1%} | "
              f"{r['cloning_exact']:.1%} | {r['single_voice']:.1%} |" for lang, r in by_language.items()]
    evaluation = json.loads((work / "eval" / "table.json").read_text()) if (work / "eval" / "table.json").is_file() else None
    if evaluation:
        langs = sorted({lang for c in evaluation["checkpoints"] for lang in c["languages"]})
        lines += ["", "Checkpoint evaluation (python -m speechlm.evaluate, beside SFT): every SFT checkpoint spoke the "
                  "held-out set; CER/WER of the synthetic ASR's transcript (the codec read back), speaker similarity "
                  "of the cloning items to their reference (synthetic speakers); eval/table.md has every column.", "",
                  f"| checkpoint | step | {' | '.join(f'CER {lang}' for lang in langs)} | CER (mean) | WER (mean) | "
                  "failure rate | speaker similarity |", "|---|---:|" + "---:|" * (len(langs) + 4)]
        for c in evaluation["checkpoints"]:
            m = c["macro"]
            sim = "–" if m.get("speaker_similarity") is None else f"{m['speaker_similarity']:.3f}"
            lines.append(f"| {c['checkpoint']} | {c['step']} | "
                         + " | ".join(f"{c['languages'][lang]['cer']:.4f}" if lang in c["languages"] else "–" for lang in langs)
                         + f" | {m['cer']:.4f} | {m['wer']:.4f} | {m['failure_rate']:.1%} | {sim} |")
        lines += ["", f"Pinned (best by mean {evaluation['metric']}, kept by retention): "
                  f"{', '.join(evaluation['pinned']) or 'none'}"]
    lines += ["", "| stage | first training loss | last training loss |", "|---|---|---|"]
    lines += [f"| {name} | {v['train_first']:.3f} | {v['train_last']:.3f} |" for name, v in losses.items() if v["train_first"]]
    lines += ["", "| validation set (last evaluation) | stage | lm loss |", "|---|---|---|"]
    lines += [f"| {s} | {name} | {loss:.3f} |" for name, v in losses.items() for s, loss in sorted(v["validation"].items())]
    result = {**overall, "by_language": by_language, "losses": losses, "goal": ACCURACY_GOAL,
              "evaluation": {"checkpoints": [{k: c[k] for k in ("checkpoint", "step", "languages", "macro")}
                                             for c in evaluation["checkpoints"]],
                             "pinned": evaluation["pinned"]} if evaluation else None}
    markdown = "\n".join(lines) + "\n"
    (work / "report.json").write_text(json.dumps(result, indent=1))
    (work / "report.md").write_text(markdown)
    return {**result, "markdown": markdown}


def goals_met(report: dict) -> bool:
    """Both accuracies, over all held-out items, at the goal."""
    return report["content_accuracy"] >= ACCURACY_GOAL and report["cloning_accuracy"] >= ACCURACY_GOAL


if __name__ == "__main__":
    sys.exit(main())
