"""Checkpoint evaluation (python -m speechlm.evaluate, issue 17): finding complete checkpoints,
pinning the best through retention, holding a checkpoint while it is exported, the watch loop,
an evaluation of a real (tiny, random) model end to end, resuming, and bad input.

The Megatron export path and --watch beside a real training run are exercised by the demo
(tests/test_demo.py: its SFT checkpoints are evaluated while SFT trains). Scoring and the
ASR/speaker backends have their own tests (test_scoring.py, test_evaluate_backends.py).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from speechlm.demo.synthetic_codec import SyntheticCodec
from speechlm.evaluate import EvaluationError, evaluator
from speechlm.train import checkpoints


def _save_dir(root: Path, iterations: list[int], tracked: int | None, final: int = 20) -> Path:
    """A checkpoint.save directory as Bridge leaves it: iter_* with run_config.yaml, and the tracker."""
    for i in iterations:
        d = checkpoints.iteration_dir(root, i)
        d.mkdir(parents=True)
        (d / "run_config.yaml").write_text(f"train:\n  train_iters: {final}\n")
    if tracked is not None:
        (root / checkpoints.TRACKER_FILE).write_text(str(tracked))
    return root


# --- finding checkpoints ---------------------------------------------------------------------------


def test_only_complete_checkpoints_are_found(tmp_path):
    save = _save_dir(tmp_path / "run", [5, 10, 15], tracked=10)  # 15: an async save still in flight
    found = evaluator.find_checkpoints([str(save)])
    assert [(c.name, c.step) for c in found] == [("iter_0000005", 5), ("iter_0000010", 10)]
    assert found[0].megatron == checkpoints.iteration_dir(save, 5).resolve() and found[0].save_dir == save.resolve()
    with pytest.raises(EvaluationError, match="newer than the iteration the tracker names"):
        evaluator.find_checkpoints([str(checkpoints.iteration_dir(save, 15))])
    # An exported HF model: its conversion.json gives the step.
    hf = tmp_path / "export"
    hf.mkdir()
    for name, text in (("config.json", "{}"), ("token_layout.json", "{}"), ("conversion.json", '{"iteration": 7}')):
        (hf / name).write_text(text)
    assert [(c.name, c.step, c.hf) for c in evaluator.find_checkpoints([str(hf)])] == [("export", 7, hf.resolve())]
    assert [c.step for c in evaluator.find_checkpoints([str(hf), str(save)])] == [5, 7, 10]


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nowhere", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "is not a checkpoint"),
    (lambda p: _save_dir(p / "untracked", [5], tracked=None), "no latest_checkpointed_iteration.txt"),
    (lambda p: (p / "iter_0000005").mkdir() or p / "iter_0000005", "no run_config.yaml"),
])
def test_a_missing_or_wrong_checkpoint_is_a_clear_error(tmp_path, make, message):
    with pytest.raises(EvaluationError, match=message):
        evaluator.find_checkpoints([str(make(tmp_path))])


# --- pinning ---------------------------------------------------------------------------------------


def _summary(save: Path, step: int, cer: float) -> dict:
    return {"checkpoint": f"iter_{step:07d}", "step": step, "path": str(checkpoints.iteration_dir(save, step)),
            "languages": {}, "macro": {"cer": cer, "wer": cer, "failure_rate": 0.0, "speaker_similarity": None}}


def test_pin_best_marks_the_best_and_retention_keeps_them(tmp_path):
    save = _save_dir(tmp_path / "run", [5, 10, 15, 20, 25], tracked=25)
    cer = {5: 0.30, 10: 0.05, 15: 0.20, 20: 0.08, 25: 0.50}
    prefix = "speechlm.evaluate --pin-best (/evals/a)"
    pinned = evaluator.pin_best([_summary(save, s, c) for s, c in cer.items()], 2, "cer", prefix)
    assert pinned == ["iter_0000010", "iter_0000020"]
    assert checkpoints.pinned_iterations(save, []) == {10, 20}
    assert checkpoints.pin_note(checkpoints.iteration_dir(save, 10)).startswith(prefix + ": mean cer")
    # Retention (keep the last 1) deletes everything else and keeps the pinned ones.
    policy = {"schedule": [], "keep_last": 1, "pinned": [], "provenance": {}}
    assert checkpoints.after_durable_save(save, 25, policy) == [5, 15]
    assert checkpoints.saved_iterations(save) == [10, 20, 25]

    # A better checkpoint arrives: the one that fell out of the best 2 is unpinned, a user's pin stays.
    save30 = _save_dir(save, [30], tracked=30)
    (checkpoints.iteration_dir(save, 20) / checkpoints.PIN_FILE).unlink()
    (checkpoints.iteration_dir(save, 20) / checkpoints.PIN_FILE).touch()  # the user pins 20 by hand
    summaries = [_summary(save, s, c) for s, c in {10: 0.05, 20: 0.08, 25: 0.5, 30: 0.01}.items()]
    assert evaluator.pin_best(summaries, 1, "cer", prefix) == ["iter_0000030"]
    assert checkpoints.pin_note(checkpoints.iteration_dir(save, 10)) is None  # ours, no longer the best
    assert checkpoints.pin_note(checkpoints.iteration_dir(save, 20)) == ""  # the user's, untouched
    assert checkpoints.after_durable_save(save30, 30, policy) == [10, 25]
    # Another evaluation's pins (another --out) are not this one's to remove.
    other = "speechlm.evaluate --pin-best (/evals/b)"
    evaluator.pin_best(summaries[:2], 1, "cer", other)
    assert checkpoints.pin_note(checkpoints.iteration_dir(save, 30)).startswith(prefix)


# --- the evaluation set and a real model ---------------------------------------------------------


def _eval_set(tmp_path: Path, codec: SyntheticCodec, *, extra: list[dict] = ()) -> Path:
    """Two sentences to speak and one to speak in a reference's voice, in the demo's format."""
    rng = np.random.default_rng(0)
    lines = []
    for i, lang in enumerate(("hi", "en")):
        s = codec.random_sentence(lang, rng)
        lines.append({"id": f"{lang}-{i}", "text": s.text, "language": lang, "duration": codec.duration(s.text, lang)})
    ref, target = codec.random_sentence("ta", rng, (1, 1)), codec.random_sentence("ta", rng, (2, 2))
    np.save(tmp_path / "ref.npy", codec.codes(ref.text, "ta", speaker=2))
    lines.append({"id": "ta-clone", "text": target.text, "language": "ta", "prompt_codes": "ref.npy",
                  "prompt_text": ref.text})
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in [*lines, *extra]))
    return path


def _args(eval_set: Path, out: Path, *checkpoints_: Path, **more) -> list[str]:
    argv = ["--checkpoints", *map(str, checkpoints_), "--eval-set", str(eval_set), "--out", str(out),
            "--asr", "synthetic", "--speaker-model", "synthetic", "--max-new-tokens", "6", "--batch-size", "2"]
    for k, v in more.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


@pytest.fixture(scope="module")
def evaluated_tiny(expanded_tiny_dir, tmp_path_factory):
    """A tiny random expanded HF model evaluated on three items (it speaks noise: CER near 1)."""
    tmp = tmp_path_factory.mktemp("eval")
    eval_set = _eval_set(tmp, SyntheticCodec())
    out = tmp / "out"
    assert evaluator.main(_args(eval_set, out, expanded_tiny_dir, pin_best=1)) == 0
    return eval_set, out, expanded_tiny_dir


def test_an_hf_model_is_spoken_transcribed_and_scored(evaluated_tiny):
    eval_set, out, model = evaluated_tiny
    name = model.name
    records = [json.loads(line) for line in (out / name / "items.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["hi-0", "en-1", "ta-clone"]
    codec = SyntheticCodec()
    for r in records:
        codes = np.load(out / name / "synth" / f"{r['id']}.npy")
        assert len(codes) == r["codes"] <= 6
        # The transcript is the codec read back (a random model: mostly <unk>), scored against the text.
        assert r["transcript"] == " ".join(w or "<unk>" for w, _ in codec.transcribe(codes, r["language"]))
        assert r["chars"] == len(r["text"]) and r["cer"] == r["char_edits"] / r["chars"]
        assert ("no_speech_end" in r["failures"]) == (r["stop"] != "speech_end")
    assert records[0]["expected_seconds"] == json.loads(eval_set.read_text().splitlines()[0])["duration"]
    assert records[0]["speaker_similarity"] is None  # no reference
    assert (records[2]["speaker_similarity"] is None) == (records[2]["codes"] == 0)
    summary = json.loads((out / name / "summary.json").read_text())
    assert set(summary["languages"]) == {"hi", "en", "ta"} and summary["step"] is None
    table = json.loads((out / "table.json").read_text())
    assert [c["checkpoint"] for c in table["checkpoints"]] == [name]
    assert table["pinned"] == []  # an HF directory is not a training checkpoint: nothing to pin
    assert f"| {name} | – | hi |" in (out / "table.md").read_text()
    assert (out / "cer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_interrupted_evaluation_resumes_without_redoing_work(evaluated_tiny, tmp_path, monkeypatch):
    from speechlm.evaluate import asr
    from speechlm.synthesize import synthesizer

    eval_set, done, model = evaluated_tiny
    out = tmp_path / "out"
    transcribed: list[str] = []
    spoken: list[str] = []
    real_transcribe, real_generate = asr.SyntheticASR.transcribe, synthesizer.Synthesizer.generate

    def transcribe(self, utts):
        if len(transcribed) == 2:
            raise KeyboardInterrupt  # killed while scoring the second batch
        transcribed.extend(u.id for u in utts)
        return real_transcribe(self, utts)

    def generate(self, items, *a, **k):
        spoken.extend(it.id for it in items)
        return real_generate(self, items, *a, **k)

    monkeypatch.setattr(asr.SyntheticASR, "transcribe", transcribe)
    monkeypatch.setattr(synthesizer.Synthesizer, "generate", generate)
    with pytest.raises(KeyboardInterrupt):
        evaluator.main(_args(eval_set, out, model))
    assert transcribed == ["hi-0", "en-1"] and sorted(spoken) == ["en-1", "hi-0", "ta-clone"]
    items = out / model.name / "items.jsonl"
    with open(items, "a") as f:
        f.write('{"id": "ta-clo')  # and a line cut short by the kill
    assert not (out / model.name / "summary.json").exists()

    transcribed.clear(), spoken.clear()
    assert evaluator.main(_args(eval_set, out, model)) == 0
    assert transcribed == ["ta-clone"] and spoken == []  # only what was missing
    assert items.read_text() == (done / model.name / "items.jsonl").read_text()
    # A finished checkpoint is not touched again.
    transcribed.clear()
    assert evaluator.main(_args(eval_set, out, model)) == 0
    assert transcribed == [] and spoken == []


def test_another_evaluation_set_in_the_same_out_is_refused(evaluated_tiny, tmp_path, capsys):
    eval_set, out, model = evaluated_tiny
    other = tmp_path / "other.jsonl"
    other.write_text(eval_set.read_text().splitlines()[0] + "\n")
    assert evaluator.main(_args(other, out, model)) == 2
    assert "holds an evaluation with other settings (eval_set, eval_set_sha256)" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ({"id": "x", "text": "  ", "language": "hi"}, "x: empty text"),
    ({"id": "y", "language": "hi"}, "y: empty text"),
    ({"id": "z", "text": "hello", "language": "xx"}, "z: unknown language 'xx'"),
    ({"id": "w", "text": "hello", "language": "en", "duration": -1}, "duration must be a number of seconds > 0"),
    ({"id": "v", "text": "।", "language": "hi"}, "v: the text '।' has nothing to score once normalised"),
])
def test_a_bad_evaluation_line_is_a_clear_error(expanded_tiny_dir, tmp_path, capsys, line, message):
    eval_set = _eval_set(tmp_path, SyntheticCodec(), extra=[line])
    assert evaluator.main(_args(eval_set, tmp_path / "out", expanded_tiny_dir)) == 2
    err = capsys.readouterr().err
    assert message in err and ("eval.jsonl:4" in err or "eval.jsonl: v" in err), err
    assert not (tmp_path / "out").exists()


def test_missing_inputs_are_clear_errors(expanded_tiny_dir, tmp_path, capsys):
    eval_set = _eval_set(tmp_path, SyntheticCodec())
    assert evaluator.main(_args(eval_set, tmp_path / "out", tmp_path / "no-such-ckpt")) == 2
    assert "checkpoint " + str(tmp_path / "no-such-ckpt") + " does not exist" in capsys.readouterr().err
    assert evaluator.main(_args(tmp_path / "none.jsonl", tmp_path / "out", expanded_tiny_dir)) == 2
    assert "evaluation set" in capsys.readouterr().err
    argv = _args(eval_set, tmp_path / "out", expanded_tiny_dir)
    argv[argv.index("synthetic")] = str(tmp_path / "no-whisper")
    assert evaluator.main(argv) == 2
    assert str(tmp_path / "no-whisper") in capsys.readouterr().err


# --- holding a checkpoint while exporting it, and the watch loop ---------------------------------


def test_a_checkpoint_being_exported_is_held_against_retention(expanded_tiny_dir, tmp_path, monkeypatch):
    save = _save_dir(tmp_path / "run", [5, 10], tracked=10)
    ev = evaluator.Evaluator(evaluator.build_parser().parse_args(
        _args(_eval_set(tmp_path, SyntheticCodec()), tmp_path / "out", save)))
    policy = {"schedule": [], "keep_last": 1, "pinned": [], "provenance": {}}
    seen = {}

    def export(cmd, **kwargs):  # stands in for the converter: training saves 15 meanwhile, retention runs
        _save_dir(save, [15], tracked=15)
        seen["deleted"] = checkpoints.after_durable_save(save, 15, policy)
        seen["note"] = checkpoints.pin_note(checkpoints.iteration_dir(save, 5))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(evaluator.subprocess, "run", export)
    ckpt = evaluator.find_checkpoints([str(save)])[0]
    work = tmp_path / "out" / ckpt.name
    work.mkdir(parents=True)
    ev.export(ckpt, work)
    assert seen == {"deleted": [10], "note": ev.hold_note}  # 5 was held; 10 was not being read
    assert checkpoints.pin_note(checkpoints.iteration_dir(save, 5)) is None  # released afterwards
    # A checkpoint retention has already deleted is skipped, not an error.
    gone = evaluator.Checkpoint("iter_0000010", 10, megatron=checkpoints.iteration_dir(save, 10))
    with pytest.raises(evaluator.CheckpointGone):
        ev.export(gone, work)


def test_watch_reads_only_complete_checkpoints_and_stops_at_the_final_one(tmp_path, monkeypatch):
    save = _save_dir(tmp_path / "run", [], tracked=None, final=15)
    evaluated: list[tuple[int, int | None]] = []

    class FakeEvaluator:
        out = tmp_path / "out"

        def done(self, c):
            return c.step in {s for s, _ in evaluated}

        def evaluate(self, c):
            evaluated.append((c.step, checkpoints.tracked_iteration(save)))

    monkeypatch.setattr(evaluator, "publish", lambda ev: [])

    def train():  # saves 5, 10, 15; each directory appears before the tracker names it
        for step in (5, 10, 15):
            time.sleep(0.3)
            _save_dir(save, [step], tracked=None, final=15)
            time.sleep(0.3)
            (save / checkpoints.TRACKER_FILE).write_text(str(step))

    trainer = threading.Thread(target=train)
    trainer.start()
    evaluator.watch(FakeEvaluator(), save, until=None, poll_seconds=0.05)
    trainer.join()
    assert [s for s, _ in evaluated] == [5, 10, 15]
    assert all(tracked is not None and step <= tracked for step, tracked in evaluated)

    # --until stops earlier, and ignores later checkpoints.
    evaluated.clear()
    evaluator.watch(FakeEvaluator(), save, until=10, poll_seconds=0.05)
    assert [s for s, _ in evaluated] == [5, 10]
