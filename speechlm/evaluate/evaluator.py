"""Checkpoint evaluation: speak a fixed evaluation set with each checkpoint, transcribe it, score it.

    python -m speechlm.evaluate --checkpoints CKPT_DIR [MORE ...] --eval-set eval.jsonl --out DIR \\
        --asr WHISPER_DIR [--asr hi=INDIC_WHISPER_HI ...] --codec XCODEC2_DIR [--speaker-model SV_DIR] \\
        [--pin-best K --metric cer]
    python -m speechlm.evaluate --watch SAVE_DIR --eval-set eval.jsonl --out DIR --asr ... --codec ... --pin-best 2

Checkpoints: a training run's save directory (every complete `iter_*` in it: the one Megatron's
tracker, latest_checkpointed_iteration.txt, names and older ones), one `iter_*` directory, or an
exported HF model (conversion/megatron_to_hf.py's output; its conversion.json gives the step).
For each: a Megatron checkpoint is exported to HF with the project's converter (pinned while it
is read, so retention cannot delete it mid-read); the evaluation set is spoken with the project's
synthesis (greedy by default; voice-cloning prompts when a line has them); decoded to 16 kHz
audio with XCodec2 when the ASR or speaker model needs audio; transcribed; scored
(speechlm/evaluate/scoring.py: CER/WER per language after normalisation, failures, duration
ratio; speaker similarity to the reference clip when a line has one and --speaker-model is given).

The evaluation set is speechlm.synthesize's batch format ({"id", "text", "language"} and, to
clone a voice, "prompt_codes" or "prompt_wav" with "prompt_text"), plus an optional "duration":
the seconds of the real recording, which the duration check uses instead of a characters-per-
second estimate.

In --out (resumable: a scored item, a finished checkpoint, a finished export are not redone):
  settings.json                    the evaluation set's sha256 and the settings; a rerun must match
  <checkpoint>/hf/                 the export (deleted once scored, unless --keep-exports)
  <checkpoint>/synth/              synthesis output per item (<id>.npy, .wav, .json)
  <checkpoint>/items.jsonl         per-item results, appended as they are scored
  <checkpoint>/summary.json        per-language and overall scores; written last: the checkpoint is done
  table.md, table.json             checkpoint x language, and the pinned choice
  cer.png                          CER against training step, per language

--pin-best K --metric M: the K best checkpoints by M (the mean over languages) are pinned through
the retention policy (speechlm.train.checkpoints: a PINNED file; retention never deletes them);
checkpoints this evaluation pinned earlier and no longer among the best are unpinned. A pin
someone else made is never removed.

--watch SAVE_DIR: evaluates checkpoints as they land, oldest first, and stops once the tracker
names the run's final iteration (train.train_iters of its run config), or --until STEP, and
everything up to it is evaluated. A checkpoint retention deleted before it could be read is
reported and skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speechlm import atomic
from speechlm.evaluate import EvaluationError, Utterance
from speechlm.token_layout import LAYOUT_FILE
from speechlm.train import checkpoints as ckpts

REPO = Path(__file__).resolve().parents[2]
EXPORT_SCRIPT = REPO / "conversion" / "megatron_to_hf.py"
EXPORT_FILE = "conversion.json"  # = speechlm.model.conversion.SUMMARY_FILE (not imported: it imports torch + Megatron paths)
SETTINGS_FILE = "settings.json"
SUMMARY_FILE = "summary.json"
ITEMS_FILE = "items.jsonl"


@dataclass(frozen=True)
class Checkpoint:
    name: str                   # iter_0000400, or an HF directory's name: names the output directory
    step: int | None            # training iteration (None: an HF model without conversion.json)
    megatron: Path | None = None  # an iter_* directory, exported before synthesis
    hf: Path | None = None        # an HF model directory, used as it is

    @property
    def save_dir(self) -> Path | None:
        return self.megatron.parent if self.megatron else None


class CheckpointGone(Exception):
    """Retention deleted the checkpoint before it could be read."""


# --- finding checkpoints ---------------------------------------------------------------------------


def complete_iterations(save_dir: Path) -> list[int]:
    """The iterations of a save directory that are complete: up to the one the tracker names (a
    later directory may be an asynchronous save still in flight)."""
    tracked = ckpts.tracked_iteration(save_dir)
    if tracked is None:
        return []
    return [i for i in ckpts.saved_iterations(save_dir) if i <= tracked]


def _hf_checkpoint(path: Path) -> Checkpoint:
    step = None
    if (path / EXPORT_FILE).is_file():
        step = json.loads((path / EXPORT_FILE).read_text()).get("iteration")
    return Checkpoint(path.name, step, hf=path)


def find_checkpoints(specs: list[str]) -> list[Checkpoint]:
    """Every checkpoint the --checkpoints arguments name, in step order; EvaluationError for one that
    is missing or not a checkpoint."""
    found: list[Checkpoint] = []
    for spec in specs:
        path = Path(spec).resolve()
        if not path.is_dir():
            raise EvaluationError(f"checkpoint {spec} does not exist")
        if (path / "config.json").is_file() and (path / LAYOUT_FILE).is_file():
            found.append(_hf_checkpoint(path))
        elif m := ckpts.ITER_DIR.match(path.name):
            if not (path / "run_config.yaml").is_file():
                raise EvaluationError(f"{path}: no run_config.yaml: not a complete Megatron-Bridge checkpoint")
            tracked = ckpts.tracked_iteration(path.parent)
            if tracked is not None and int(m[1]) > tracked:
                raise EvaluationError(f"{path}: newer than the iteration the tracker names ({tracked}): "
                                      "its save may not be finished")
            found.append(Checkpoint(path.name, int(m[1]), megatron=path))
        elif ckpts.saved_iterations(path):
            its = complete_iterations(path)
            if not its:
                raise EvaluationError(f"{path}: no {ckpts.TRACKER_FILE}, so no iteration is known to be complete")
            found += [Checkpoint(ckpts.iteration_dir(path, i).name, i, megatron=ckpts.iteration_dir(path, i)) for i in its]
        else:
            raise EvaluationError(f"{spec} is not a checkpoint: expected a save directory with iter_* directories, "
                                  f"an iter_* directory, or an exported HF model (config.json + {LAYOUT_FILE})")
    names = [c.name for c in found]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise EvaluationError(f"two checkpoints named {', '.join(dup)}: evaluate them into separate --out directories")
    return sorted(found, key=lambda c: (c.step is None, c.step or 0, c.name))


def final_iteration(save_dir: Path) -> int | None:
    """train.train_iters of the run, from the run config of the checkpoint the tracker names."""
    import yaml

    tracked = ckpts.tracked_iteration(save_dir)
    if tracked is None:
        return None
    try:
        run = yaml.safe_load((ckpts.iteration_dir(save_dir, tracked) / "run_config.yaml").read_text()) or {}
    except FileNotFoundError:
        return None
    return (run.get("train") or {}).get("train_iters")


# --- the evaluation set ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalItem:
    item: object                # speechlm.synthesize.synthesizer.Item (text, language, reference)
    duration: float | None      # seconds of the real recording, when the set gives it
    reference_wav: Path | None  # the reference recording (prompt_wav), for a speaker model that needs audio


def read_eval_set(path: Path, encode=None) -> list[EvalItem]:
    """The evaluation set, checked as speechlm.synthesize checks a batch (every problem at once), plus
    each line's optional duration."""
    from speechlm.synthesize.synthesizer import SynthesisError, read_batch

    if not path.is_file():
        raise EvaluationError(f"evaluation set {path} does not exist")
    try:
        items = read_batch(path, encode)
    except SynthesisError as e:
        raise EvaluationError(f"evaluation set {path}: {e}") from None
    extra: dict[str, tuple] = {}
    problems = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            rec = json.loads(line)
            d = rec.get("duration")
            if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not d > 0):
                problems.append(f"{path}:{n}: duration must be a number of seconds > 0, got {d!r}")
            wav = rec.get("prompt_wav")
            extra[str(rec.get("id"))] = (d, path.parent / wav if isinstance(wav, str) else None)
    from speechlm.evaluate.scoring import normalize

    problems += [f"{path}: {it.id}: the text {it.text!r} has nothing to score once normalised (only punctuation)"
                 for it in items if not normalize(it.text)]
    if problems:
        raise EvaluationError("bad evaluation set:\n  " + "\n  ".join(problems[:20]))
    return [EvalItem(it, *extra[it.id]) for it in items]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- one checkpoint ----------------------------------------------------------------------------------


class Evaluator:
    """Loads the ASR, speaker model and codec once, then evaluates checkpoints into `out`."""

    def __init__(self, args: argparse.Namespace):
        from speechlm.evaluate import asr as asr_backends
        from speechlm.evaluate import speaker as speaker_backends
        from speechlm.synthesize.synthesizer import ReferenceEncoder, Sampling, pick_device

        self.args, self.out = args, Path(args.out).resolve()
        self.device = pick_device(args.device)
        self.asr = asr_backends.load_asr(args.asr, self.device)
        self.speaker = speaker_backends.load_speaker_model(args.speaker_model, self.device) if args.speaker_model else None
        self.needs_audio = self.asr.needs_audio or bool(self.speaker and self.speaker.needs_audio)
        if self.needs_audio and not args.codec:
            raise EvaluationError("the ASR or speaker model reads audio: give --codec XCODEC2_DIR to decode the codes")
        encode = ReferenceEncoder(args.codec, self.device) if args.codec else None
        self.eval_set = Path(args.eval_set).resolve()
        self.items = read_eval_set(self.eval_set, encode)
        self.sampling = Sampling(temperature=args.temperature, seed=args.seed)
        self.settings = {"eval_set": str(self.eval_set), "eval_set_sha256": file_sha256(self.eval_set),
                         "asr": list(args.asr), "speaker_model": args.speaker_model,
                         "sampling": vars(self.sampling), "codes_per_char": args.codes_per_char,
                         "max_new_tokens": args.max_new_tokens}
        self.codec = None
        if args.codec:
            from speechlm.synthesize import xcodec2_decoder

            try:
                self.codec = xcodec2_decoder.load(args.codec, self.device)
            except xcodec2_decoder.CodecUnavailable as e:
                if self.needs_audio:
                    raise EvaluationError(f"--codec {args.codec}: the XCodec2 decoder does not load: {e}") from None
                print(f"XCodec2 unavailable ({e}): scoring the codes only", flush=True)
        self.pin_prefix = f"speechlm.evaluate --pin-best ({self.out})"
        self.hold_note = f"speechlm.evaluate ({self.out}): reading"

    def check_out(self) -> None:
        """--out holds one evaluation: the same set and settings, or nothing yet."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / SETTINGS_FILE
        if path.is_file():
            before = json.loads(path.read_text())
            if before != self.settings:
                changed = sorted(k for k in self.settings if before.get(k) != self.settings[k])
                raise EvaluationError(f"{self.out} holds an evaluation with other settings ({', '.join(changed)}): "
                                      "use another --out, or delete it to start over")
        else:
            atomic.write_text(path, json.dumps(self.settings, indent=1))

    def done(self, ckpt: Checkpoint) -> bool:
        return (self.out / ckpt.name / SUMMARY_FILE).is_file()

    def evaluate(self, ckpt: Checkpoint) -> dict:
        """Export (if needed), synthesise, score one checkpoint; returns its summary."""
        work = self.out / ckpt.name
        if self.done(ckpt):
            return json.loads((work / SUMMARY_FILE).read_text())
        t0 = time.perf_counter()
        label = f"{ckpt.name}" + (f" (step {ckpt.step})" if ckpt.step is not None else "")
        print(f"\n== {label}", flush=True)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = ckpt.hf or self.export(ckpt, work)
        self.synthesize(model_dir, work / "synth")
        records = self.score(ckpt, work)
        from speechlm.evaluate import scoring

        summary = {"checkpoint": ckpt.name, "step": ckpt.step,
                   "path": str(ckpt.megatron or ckpt.hf), **scoring.summarize(records),
                   "seconds": round(time.perf_counter() - t0, 1)}
        atomic.write_text(work / SUMMARY_FILE, json.dumps(summary, indent=1, ensure_ascii=False))  # last: done
        if ckpt.megatron and not self.args.keep_exports:
            shutil.rmtree(work / "hf", ignore_errors=True)
        print(f"{label}: {format_summary(summary)} ({summary['seconds']:.0f} s)", flush=True)
        return summary

    def export(self, ckpt: Checkpoint, work: Path) -> Path:
        """The project's converter in its own process, with the checkpoint pinned while it reads it."""
        hf = work / "hf"
        if (hf / LAYOUT_FILE).is_file():  # the converter writes the layout last
            return hf
        try:
            ckpts.pin(ckpt.megatron, self.hold_note)
        except FileNotFoundError:
            raise CheckpointGone(ckpt.name) from None
        try:
            # Retention may have listed it before the pin landed: read only what is still whole.
            if not (ckpt.megatron / "run_config.yaml").is_file():
                raise CheckpointGone(ckpt.name)
            dtype = "bf16" if self.device.startswith("cuda") else "fp32"
            print(f"exporting {ckpt.megatron} to HF ({dtype})", flush=True)
            log = work / "export.log"
            with open(log, "w") as f:
                rc = subprocess.run([sys.executable, str(EXPORT_SCRIPT), "--input", str(ckpt.megatron), "--output",
                                     str(hf), "--dtype", dtype], cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                if not (ckpt.megatron / "run_config.yaml").is_file():
                    raise CheckpointGone(ckpt.name)
                tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
                raise EvaluationError(f"exporting {ckpt.megatron} failed (exit {rc}; {log}):\n{tail}")
        finally:
            ckpts.unpin(ckpt.megatron, self.hold_note)  # ours, or the one a killed run of this --out left
        return hf

    def synthesize(self, model_dir: Path, synth_dir: Path) -> None:
        from speechlm.synthesize import synthesizer

        items = [e.item for e in self.items]
        if all((synth_dir / f"{it.id}.json").is_file() for it in items):
            return
        try:
            synth = synthesizer.Synthesizer(model_dir, self.args.device)
            synth.check(items, self.args.codes_per_char, self.args.max_new_tokens)
        except synthesizer.SynthesisError as e:
            raise EvaluationError(f"{model_dir}: {e}") from None
        print(f"speaking {len(items)} items with {model_dir}", flush=True)
        synthesizer.synthesize(synth, items, synth_dir, self.sampling, batch_size=self.args.batch_size,
                               codes_per_char=self.args.codes_per_char, max_new_tokens=self.args.max_new_tokens,
                               codec=self.codec if self.needs_audio else None)

    def score(self, ckpt: Checkpoint, work: Path) -> list[dict]:
        """Per-item scores, appended to items.jsonl batch by batch; items already there are kept."""
        from speechlm.evaluate import scoring

        records = read_records(work / ITEMS_FILE)
        scored = {r["id"] for r in records}
        todo = [e for e in self.items if e.item.id not in scored]
        synth_dir = work / "synth"
        if todo:
            print(f"scoring {len(todo)} items" + (f" ({len(scored)} already scored)" if scored else ""), flush=True)
        for start in range(0, len(todo), self.args.batch_size):
            batch = todo[start:start + self.args.batch_size]
            stats = [json.loads((synth_dir / f"{e.item.id}.json").read_text()) for e in batch]
            utts = [Utterance(e.item.id, e.item.language, np.load(synth_dir / f"{e.item.id}.npy"),
                              synth_dir / s["wav"] if s.get("wav") else None) for e, s in zip(batch, stats)]
            transcripts = self.asr.transcribe(utts)
            similarity = self.similarity(batch, utts, work)
            lines = []
            for e, s, utt, hyp in zip(batch, stats, utts, transcripts):
                expected = scoring.expected_seconds(e.item.text, e.duration)
                rec = {"id": e.item.id, "language": e.item.language, "checkpoint": ckpt.name, "step": ckpt.step,
                       "text": e.item.text, "transcript": hyp, **scoring.edits(e.item.text, hyp),
                       "codes": s["codes"], "stop": s["stop"], "rejected": s["rejected"],
                       "audio_seconds": s["audio_seconds"], "expected_seconds": expected,
                       "duration_ratio": scoring.duration_ratio(s["audio_seconds"], expected),
                       "failures": scoring.failures(s["stop"], s["rejected"], s["codes"], s["audio_seconds"], expected),
                       "speaker_similarity": similarity.get(e.item.id)}
                lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
                records.append(rec)
            with open(work / ITEMS_FILE, "a", encoding="utf-8") as f:
                f.write("".join(lines))
        return records

    def similarity(self, batch: list[EvalItem], utts: list[Utterance], work: Path) -> dict[str, float]:
        """Cosine of the speaker embeddings of each generated clip and its reference (items with one)."""
        if self.speaker is None:
            return {}
        from speechlm.evaluate.speaker import cosine

        pairs = [(e, u) for e, u in zip(batch, utts) if e.item.reference is not None and len(u.codes)]
        if not pairs:
            return {}
        refs = [Utterance(e.item.id, e.item.language, e.item.reference.codes, self.reference_wav(e, work)) for e, _ in pairs]
        ref_emb = self.speaker.embed(refs)
        gen_emb = self.speaker.embed([u for _, u in pairs])
        return {e.item.id: cosine(a, b) for (e, _), a, b in zip(pairs, gen_emb, ref_emb)}

    def reference_wav(self, e: EvalItem, work: Path) -> Path | None:
        """The reference recording, or (for a speaker model that needs audio) its codes decoded once."""
        if not (self.speaker and self.speaker.needs_audio):
            return None
        if e.reference_wav is not None:
            return e.reference_wav
        from speechlm.synthesize.synthesizer import write_wav

        path = self.out / "references" / f"{e.item.id}.wav"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_wav(path, self.codec.decode(e.item.reference.codes))
        return path


def read_records(path: Path) -> list[dict]:
    """items.jsonl as written so far; a last line cut short by a kill is dropped (and rescored)."""
    if not path.is_file():
        return []
    records, good = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                records.append(json.loads(raw))
            except ValueError:
                break
            good += len(raw)
    if good < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return records


# --- tables, plot, pins ----------------------------------------------------------------------------


def format_summary(summary: dict) -> str:
    langs = " ".join(f"{lang} {v['cer']:.3f}" for lang, v in summary["languages"].items())
    macro = summary["macro"]
    sim = f", speaker similarity {macro['speaker_similarity']:.3f}" if macro.get("speaker_similarity") is not None else ""
    return f"CER {langs} (mean {macro['cer']:.3f}), WER {macro['wer']:.3f}, failures {macro['failure_rate']:.1%}{sim}"


def evaluated(out: Path) -> list[dict]:
    """Every finished checkpoint summary in `out`, in step order."""
    found = [json.loads(p.read_text()) for p in out.glob(f"*/{SUMMARY_FILE}")]
    return sorted(found, key=lambda s: (s["step"] is None, s["step"] or 0, s["checkpoint"]))


def _cell(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def write_tables(out: Path, summaries: list[dict], pinned: list[str], metric: str | None) -> None:
    lines = ["# Checkpoint evaluation", "",
             f"Evaluation set: {json.loads((out / SETTINGS_FILE).read_text())['eval_set']}. CER/WER after the "
             "normalisation of speechlm/evaluate/scoring.py; failures: no <|speech_end|>, non-code tokens, no codes, "
             "or audio far longer/shorter than the text predicts.", "",
             "| checkpoint | step | language | items | CER | WER | failure rate | duration ratio | speaker similarity |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        rows = [*s["languages"].items(), ("mean", s["macro"])]
        for lang, v in rows:
            lines.append(f"| {s['checkpoint']} | {_cell(s['step'], 'd')} | {lang} | {v.get('items', '')} | "
                         f"{v['cer']:.4f} | {v['wer']:.4f} | {v['failure_rate']:.1%} | "
                         f"{_cell(v.get('duration_ratio'), '.3f')} | {_cell(v.get('speaker_similarity'), '.3f')} |")
    if metric:
        lines += ["", f"Pinned (best {len(pinned)} by mean {metric}): {', '.join(pinned) or 'none'}"]
    atomic.write_text(out / "table.md", "\n".join(lines) + "\n")
    atomic.write_text(out / "table.json", json.dumps({"checkpoints": summaries, "pinned": pinned, "metric": metric},
                                                      indent=1, ensure_ascii=False))
    plot_cer(out / "cer.png", summaries)


def plot_cer(path: Path, summaries: list[dict]) -> None:
    """CER against training step, one line per language (checkpoints without a step are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stepped = [s for s in summaries if s["step"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    for lang in sorted({lang for s in stepped for lang in s["languages"]}):
        pts = [(s["step"], s["languages"][lang]["cer"]) for s in stepped if lang in s["languages"]]
        ax.plot(*zip(*pts), marker="o", label=lang)
    if stepped:
        ax.plot([s["step"] for s in stepped], [s["macro"]["cer"] for s in stepped], "k--", label="mean")
    ax.set_xlabel("training step")
    ax.set_ylabel("CER")
    ax.set_title("CER per language")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with atomic.atomic_path(path, per_process=False) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def pin_best(summaries: list[dict], k: int, metric: str, prefix: str) -> list[str]:
    """Pin the k best Megatron checkpoints still on disk by `metric`; unpin the ones this evaluation
    (`prefix`) pinned before that are no longer among them. Returns the pinned checkpoint names."""
    from speechlm.evaluate import scoring

    on_disk = [s for s in summaries if s["path"] and ckpts.ITER_DIR.match(Path(s["path"]).name) and Path(s["path"]).is_dir()]
    best = sorted(on_disk, key=lambda s: (scoring.rank_key(s, metric), -(s["step"] or 0)))[:k]
    keep = {s["path"] for s in best}
    for s in on_disk:
        note = ckpts.pin_note(s["path"])
        if s["path"] not in keep and note is not None and note.startswith(prefix):
            ckpts.unpin(s["path"], note)
    for s in best:
        note = f"{prefix}: mean {metric} {scoring.rank_key(s, metric):+.6f}"
        current = ckpts.pin_note(s["path"])
        if current is not None and current.startswith(prefix) and current != note:
            ckpts.unpin(s["path"], current)
        ckpts.pin(s["path"], note)
    return [s["checkpoint"] for s in best]


# --- the command -------------------------------------------------------------------------------------


def run_once(ev: Evaluator, checkpoints: list[Checkpoint]) -> None:
    for c in checkpoints:
        try:
            ev.evaluate(c)
        except CheckpointGone:
            print(f"{c.name}: deleted by retention before it could be read: skipped", flush=True)
            continue
        publish(ev)


def publish(ev: Evaluator) -> list[str]:
    summaries = evaluated(ev.out)
    pinned = pin_best(summaries, ev.args.pin_best, ev.args.metric, ev.pin_prefix) if ev.args.pin_best else []
    write_tables(ev.out, summaries, pinned, ev.args.metric if ev.args.pin_best else None)
    return pinned


def watch(ev: Evaluator, save_dir: Path, until: int | None, poll_seconds: float) -> None:
    """Evaluate each complete checkpoint as it lands; stop once the tracker reaches the final
    iteration (or `until`) and everything up to it is evaluated."""
    print(f"watching {save_dir} (every {poll_seconds:g} s)", flush=True)
    gone: set[int] = set()
    waiting_since = time.time()
    while True:
        tracked = ckpts.tracked_iteration(save_dir)
        stop_at = until if until is not None else final_iteration(save_dir)
        pending = [i for i in complete_iterations(save_dir) if i not in gone and (until is None or i <= until)
                   and not ev.done(Checkpoint(ckpts.iteration_dir(save_dir, i).name, i))]
        if pending:
            i = pending[0]
            c = Checkpoint(ckpts.iteration_dir(save_dir, i).name, i, megatron=ckpts.iteration_dir(save_dir, i))
            try:
                ev.evaluate(c)
            except CheckpointGone:
                print(f"{c.name}: deleted by retention before it could be read: skipped", flush=True)
                gone.add(i)
            publish(ev)
            waiting_since = time.time()
            continue
        if tracked is not None and stop_at is not None and tracked >= stop_at:
            print(f"the tracker names iteration {tracked} (final: {stop_at}); every checkpoint up to it is evaluated",
                  flush=True)
            return
        if time.time() - waiting_since >= 600:
            print(f"waiting for checkpoints in {save_dir} (tracker: {tracked}, final: {stop_at})", flush=True)
            waiting_since = time.time()
        time.sleep(poll_seconds)


def build_parser() -> argparse.ArgumentParser:
    from speechlm.evaluate.scoring import METRICS
    from speechlm.synthesize.synthesizer import DEFAULT_CODES_PER_CHAR

    p = argparse.ArgumentParser(prog="python -m speechlm.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoints", nargs="+", metavar="CKPT",
                      help="save directories, iter_* directories or exported HF models")
    what.add_argument("--watch", metavar="SAVE_DIR", help="a training run's checkpoint.save: evaluate checkpoints as they land")
    p.add_argument("--eval-set", required=True, metavar="JSONL", help="the evaluation set (speechlm.synthesize batch format)")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--asr", action="append", required=True, metavar="[LANG=]DIR|synthetic",
                   help="ASR: a local Whisper-family model directory for all languages; LANG=DIR for one language "
                        "(repeatable, e.g. an IndicWhisper fine-tune per language); 'synthetic': the demo codec's inverse")
    p.add_argument("--codec", metavar="DIR", help="local XCodec2 model directory: decodes codes to 16 kHz audio "
                   "(needed by a Whisper ASR or an x-vector speaker model) and encodes prompt_wav references")
    p.add_argument("--speaker-model", metavar="DIR|synthetic",
                   help="speaker-verification model directory (x-vector, e.g. a local WavLM-base-plus-sv), or 'synthetic'")
    p.add_argument("--pin-best", type=int, default=0, metavar="K", help="pin the K best checkpoints (default: pin none)")
    p.add_argument("--metric", choices=sorted(METRICS), default="cer", help="what --pin-best ranks by, averaged over "
                   "languages (default %(default)s)")
    p.add_argument("--until", type=int, metavar="STEP", help="--watch: stop after the checkpoint of this step")
    p.add_argument("--poll-seconds", type=float, default=60.0, help="--watch: how often to look (default %(default)s)")
    p.add_argument("--keep-exports", action="store_true", help="keep each checkpoint's HF export (default: deleted once scored)")
    g = p.add_argument_group("synthesis")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=8, help="items synthesised and transcribed together (default %(default)s)")
    g.add_argument("--codes-per-char", type=float, default=DEFAULT_CODES_PER_CHAR,
                   help="generation limit per character of text (default %(default)s)")
    g.add_argument("--max-new-tokens", type=int, help="a fixed generation limit instead")
    g.add_argument("--device", help="cuda, cpu (default: cuda when present)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.pin_best < 0 or args.batch_size < 1 or args.temperature < 0 or args.poll_seconds <= 0:
            raise EvaluationError("need --pin-best >= 0, --batch-size >= 1, --temperature >= 0, --poll-seconds > 0")
        if args.until is not None and not args.watch:
            raise EvaluationError("--until goes with --watch")
        checkpoints = find_checkpoints(args.checkpoints) if args.checkpoints else []
        ev = Evaluator(args)
        ev.check_out()
        if args.checkpoints:
            run_once(ev, checkpoints)
        else:
            watch(ev, Path(args.watch).resolve(), args.until, args.poll_seconds)
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summaries = evaluated(ev.out)
    print(f"\n{len(summaries)} checkpoints evaluated; table: {ev.out / 'table.md'}", flush=True)
    return 0
