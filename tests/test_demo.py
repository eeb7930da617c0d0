"""The README's main command (`make demo` -> python -m speechlm.demo) runs the whole pipeline,
learns the synthetic codec, leaves every stage's output where the README says, and a re-run
reuses what is built."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from speechlm.demo import synthetic_codec
from speechlm.demo.pipeline import ACCURACY_GOAL

pytestmark = pytest.mark.slow

# Where the README (and the demo's --help) says each stage writes.
STAGE_OUTPUTS = ["base/config.json", "expanded/token_layout.json", "ckpt/base/hf/config.json",
                 "raw/tts/shard-000000.tar", "raw/audio/shard-000000.tar", "raw/text/corpus.jsonl", "raw/heldout.jsonl",
                 "data/tts/manifest.json", "data/audio/manifest.json", "data/text/manifest.json", "data/blend.yaml",
                 "ckpt/pretrain/latest_checkpointed_iteration.txt", "ckpt/sft/latest_checkpointed_iteration.txt",
                 "export/config.json", "export/token_layout.json", "eval/table.json", "eval/table.md", "eval/cer.png",
                 "synth/summary.json", "report.md", "report.json"]


def test_demo_runs_every_stage_and_speaks_held_out_sentences(demo_run):
    out, work = demo_run.proc.stdout, demo_run.work
    assert demo_run.proc.returncode == 0, (out + demo_run.proc.stderr)[-4000:]
    for n in range(1, 13):
        assert f"=== {n}/12 " in out
    missing = [p for p in STAGE_OUTPUTS if not (work / p).exists()]
    assert not missing, missing
    report = json.loads((work / "report.json").read_text())
    # Recompute the scores from the files rather than trusting the report.
    answers = json.loads((work / "raw" / "heldout_answers.json").read_text())
    generated = {k: np.load(work / "synth" / f"{k}.npy").tolist() for k in answers}
    score = synthetic_codec.speech_scores(synthetic_codec.SyntheticCodec(), answers, generated)
    assert score["content_accuracy"] == pytest.approx(report["content_accuracy"])
    assert score["cloning_accuracy"] == pytest.approx(report["cloning_accuracy"])
    assert score["items"] == len(answers) >= 200 and score["cloning_items"] == score["items"] // 2
    assert score["content_accuracy"] >= ACCURACY_GOAL, (work / "report.md").read_text()
    assert score["cloning_accuracy"] >= ACCURACY_GOAL, (work / "report.md").read_text()
    assert f"Content accuracy: {score['content_accuracy']:.1%}" in out
    assert f"cloning accuracy: {score['cloning_accuracy']:.1%}" in out
    assert set(report["by_language"]) == {"hi", "ta", "en"}
    # Every cloning item was prompted with its reference, and only the new codes were kept.
    for key, answer in answers.items():
        stats = json.loads((work / "synth" / f"{key}.json").read_text())
        if answer["speaker"] is None:
            assert stats["reference"] is None
        else:
            assert stats["reference"]["source"].endswith(f"heldout_refs/{key}.npy")
    # Losses fell and each validation set was evaluated.
    for stage in ("pretrain", "sft"):
        losses = report["losses"][stage]
        assert losses["train_last"] < losses["train_first"], (stage, losses)
    assert {"tts/hi", "tts/ta", "tts/en", "audio/hi"} <= set(report["losses"]["pretrain"]["validation"])
    assert set(report["losses"]["sft"]["validation"]) == {"tts/hi", "tts/ta", "tts/en"}
    # Held-out sentences were never trained on: no held-out transcript is in the TTS shards.
    lines = [json.loads(line) for line in (work / "raw" / "heldout.jsonl").read_text().splitlines()]
    heldout = {x["text"] for x in lines} | {f"{x['prompt_text']} {x['text']}" for x in lines if "prompt_text" in x}
    import webdataset as wds

    shards = [str(p) for p in sorted((work / "raw" / "tts").glob("shard-*.tar"))]
    trained = {json.loads(s["json"])["text"] for s in wds.WebDataset(shards, shardshuffle=False)}
    assert trained and not (heldout & trained)
    print(f"demo: {demo_run.seconds:.0f} s, content {score['content_accuracy']:.3f}, cloning {score['cloning_accuracy']:.3f}")


def test_demo_evaluates_each_sft_checkpoint_beside_training_and_pins_the_best(demo_run):
    """Stage 8 started `speechlm.evaluate --watch` beside SFT: each checkpoint was evaluated as it
    landed (the first one before training ended), the best pinned; the final checkpoint's CER
    agrees with the report's reading of the same sentences."""
    from speechlm.train import checkpoints

    work = demo_run.work
    assert demo_run.proc.returncode == 0
    table = json.loads((work / "eval" / "table.json").read_text())
    evaluated = {c["checkpoint"]: c for c in table["checkpoints"]}
    saved = checkpoints.saved_iterations(work / "ckpt" / "sft")
    assert [c["step"] for c in table["checkpoints"]] == saved == [400, 800, 1200]
    assert all(set(c["languages"]) == {"hi", "ta", "en"} for c in table["checkpoints"])
    log = (work / "logs" / "evaluate.log").read_text()
    assert "watching" in log and "the tracker names iteration 1200 (final: 1200)" in log, log[-3000:]
    first_done = (work / "eval" / "iter_0000400" / "summary.json").stat().st_mtime
    assert first_done < (work / "logs" / "sft.log").stat().st_mtime  # while SFT was still training
    # The best by mean CER is pinned, through the retention policy's pin file.
    best = min(table["checkpoints"], key=lambda c: (c["macro"]["cer"], -c["step"]))
    assert table["pinned"] == [best["checkpoint"]]
    for name in evaluated:
        note = checkpoints.pin_note(work / "ckpt" / "sft" / name)
        assert (note is not None and note.startswith("speechlm.evaluate --pin-best")) == (name == best["checkpoint"])
    # The final checkpoint spoke exactly what stage 10 spoke with the export of the same weights;
    # an item read back exactly right has CER 0, and only those do.
    codec = synthetic_codec.SyntheticCodec()
    answers = json.loads((work / "raw" / "heldout_answers.json").read_text())
    records = {r["id"]: r for r in map(json.loads, (work / "eval" / "iter_0001200" / "items.jsonl").read_text().splitlines())}
    assert set(records) == set(answers)
    all_exact = True
    for key, want in answers.items():
        codes = np.load(work / "synth" / f"{key}.npy")
        assert np.array_equal(np.load(work / "eval" / "iter_0001200" / "synth" / f"{key}.npy"), codes), key
        exact = [w for w, _ in codec.transcribe(codes, want["language"])] == want["words"]
        assert (records[key]["cer"] == 0) == exact, (key, records[key])
        all_exact &= exact
    final = evaluated["iter_0001200"]["macro"]
    report = json.loads((work / "report.json").read_text())
    assert (final["cer"] == 0) == all_exact, final  # every sentence right <=> CER 0
    assert final["speaker_similarity"] >= 0.9 and final["failure_rate"] <= 0.05, final
    assert report["evaluation"]["pinned"] == table["pinned"]
    md = (work / "report.md").read_text()
    assert "| iter_0001200 | 1200 |" in md and f"Pinned (best by mean cer, kept by retention): {best['checkpoint']}" in md


def test_demo_rerun_reuses_every_built_stage(demo_run):
    assert demo_run.proc.returncode == 0
    mtimes = {p: (demo_run.work / p).stat().st_mtime_ns for p in STAGE_OUTPUTS[:-3]}
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "speechlm.demo", "--workdir", str(demo_run.work)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reused = re.findall(r"=== (\d+)/12 .*\[reused", proc.stdout)
    assert reused == [str(n) for n in [*range(1, 10), 11]], proc.stdout[-3000:]
    assert re.search(r"resuming: (\d+) of \1 items already done", proc.stdout)
    assert {p: (demo_run.work / p).stat().st_mtime_ns for p in mtimes} == mtimes
    assert time.time() - started < 120


def test_demo_reads_the_shards_through_s3_with_the_same_result(demo_run, tmp_path):
    """--s3 serves raw/ from a local S3 endpoint (moto over HTTP) to the data prep commands:
    the datasets they build are byte-identical to the local-file run's."""
    assert demo_run.proc.returncode == 0
    work = tmp_path / "demo-s3"
    # Stages 1-4 (model, expansion, conversion, raw shards) copied from the demo run, so they are
    # reused: only the data prep reads through S3, from the same raw files.
    for stage in ("base", "expanded", "ckpt/base", "raw"):
        shutil.copytree(demo_run.work / stage, work / stage)
    proc = subprocess.run([sys.executable, "-m", "speechlm.demo", "--workdir", str(work), "--s3", "--stop-after", "6"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "serving" in proc.stdout and "as s3://demo/" in proc.stdout and "stopped after stage 6" in proc.stdout
    assert re.findall(r"=== (\d+)/12 .*\[reused", proc.stdout) == ["1", "2", "3", "4"], proc.stdout[-3000:]
    assert "s3://demo/tts/shard-" in (work / "logs" / "build_tts.log").read_text() or \
        "s3://demo/tts/shard-" in (work / "data" / "tts" / "manifest.json").read_text()
    assert not (work / "ckpt" / "pretrain").exists()
    # The merged datasets (partials are named after their shard's URL, so they differ by name).
    built = sorted(p.relative_to(work).as_posix() for p in (work / "data").glob("*/*") if p.suffix in (".bin", ".idx"))
    assert len(built) == 2 * (6 + 6 + 6)  # (tts, audio, text) x 3 languages x (train, valid) x (.bin, .idx)
    for rel in built:
        assert (work / rel).read_bytes() == (demo_run.work / rel).read_bytes(), rel
