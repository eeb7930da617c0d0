"""The recipe matrix (issue 15): every shipped production recipe runs as shipped on CPU processes.

A row is a production recipe with its keys (through its `base:` chain) and its TP, at toy size:
only sizes change (`_sizes`), plus the CPU-only overrides of recipes/cpu_overrides.yaml (the one
list; docs/cpu_mode.md says why each). Every row starts from a converted checkpoint
(conversion/hf_to_megatron.py), validates each held-out set on its own at least twice, saves a
checkpoint, stops and resumes:

| recipe                  | TP | processes | model                           | stop, resume                                  |
|-------------------------|----|-----------|---------------------------------|-----------------------------------------------|
| pretrain_llama32_1b     | 1  | 2         | tiny (tied)                     | SIGTERM at 7, resume to 20; an uninterrupted reference |
| sft_llama32_1b          | 1  | 2         | the 1B row's checkpoint         | SIGTERM at 16, resume to 20; an uninterrupted reference |
| pretrain_llama32_3b     | 2  | 2         | tiny (tied)                     | train.exit_interval 2, resume to 4            |
| pretrain_llama31_8b     | 4  | 4         | tiny 8B-shaped (untied, 4 KV heads) | exit_interval 2, resume to 4, export to HF --verify |

Megatron runs in subprocesses (torchrun); this process never switches on the CPU mode.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO, run_torchrun
from speechlm.train import checkpoints
from speechlm.train.recipe import load_recipe

pytestmark = pytest.mark.slow

CPU_OVERRIDES_FILE = REPO / "recipes" / "cpu_overrides.yaml"
SETS = ("audio/hi", "audio/ta", "text/en", "tts/hi")  # the held-out sets of conftest's synthetic blend


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def cpu_overrides() -> list[str]:
    """recipes/cpu_overrides.yaml as key=value overrides."""
    return [f"{k}={json.dumps(v)}" for k, v in _flat(yaml.safe_load(CPU_OVERRIDES_FILE.read_text())).items()]


def _sizes(iters: int, eval_every: int, save_every: int, *extra: str) -> list[str]:
    """The toy sizes of a row: besides cpu_overrides(), the only recipe values a row changes."""
    return [f"train.train_iters={iters}", "train.global_batch_size=4", "dataset.seq_length=64",
            "dataset.num_workers=0", f"validation.eval_interval={eval_every}", "validation.eval_iters=2",
            f"speechlm.checkpoint_schedule=[[null,{save_every}]]", *extra]


def _args(recipe: str, model, blend, ckpt, start, *sizes: str) -> list[str]:
    return ["-m", "speechlm.train", "--config", f"recipes/{recipe}.yaml", f"speechlm.hf_model={model}",
            f"speechlm.blend={blend}", f"checkpoint.save={ckpt}", f"checkpoint.pretrained_checkpoint={start}",
            *cpu_overrides(), *sizes]


def _losses(log: str, key: str = "lm loss") -> dict[int, float]:
    return {int(i): float(v) for i, v in re.findall(rf"iteration\s+(\d+)/\s*\d+ \|.*?\| {key}: ([0-9.E+-]+)", log)}


def _per_set(log: str) -> dict[str, dict[int, float]]:
    """speechlm.train.validation's per-set losses: {set: {iteration: loss}} (the last line of each wins)."""
    found: dict[str, dict[int, float]] = {}
    for name, it, loss in re.findall(r"validation (\S+) at iteration (\d+) \| lm loss: ([0-9.E+-]+)", log):
        found.setdefault(name, {})[int(it)] = float(loss)
    return found


def _tensorboard_tags(directory) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for root, _, files in os.walk(directory):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            tags |= set(acc.Tags()["scalars"])
    return tags


def _run(nproc: int, args: list[str], log: Path) -> str:
    rc, text = run_torchrun(nproc, args, log, timeout=900)
    assert rc == 0, text[-4000:]
    return text


def _run_until_sigterm(nproc: int, args: list[str], log_path: Path, at_iteration: int) -> str:
    """Start a run, and once it logs `at_iteration` signal every task as srun does on a SLURM time limit."""
    import psutil

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.time() + 600
            while not re.search(rf"iteration\s+{at_iteration}/", log_path.read_text()):
                assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.2)
            for child in psutil.Process(proc.pid).children():
                child.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    log = log_path.read_text()
    assert rc == 0 and "exiting program after receiving SIGTERM" in log, log[-3000:]
    return log


def _assert_ran_as_shipped(recipe: str, args: list[str], iter_dir: Path) -> None:
    """Bridge's run config of a checkpoint (what Megatron applied) holds every value the recipe
    states through its base chain, except the keys the row overrides."""
    overridden = {a.split("=", 1)[0] for a in args if "=" in a}
    if "speechlm.checkpoint_schedule" in overridden:
        overridden.add("checkpoint.save_interval")  # the schedule sets it
    shipped = _flat(OmegaConf.to_container(load_recipe(REPO / "recipes" / f"{recipe}.yaml")))
    ran = _flat(yaml.safe_load((iter_dir / "run_config.yaml").read_text()))
    # Keys the run's config has no field for are skipped (SFT's packed dataset has no GPTDataset flags).
    differ = {k: (v, ran[k]) for k, v in shipped.items()
              if not k.startswith("speechlm.") and k not in overridden and k in ran
              and not (isinstance(v, str) and (v.startswith("${") or v == "???")) and ran[k] != v}
    assert not differ, f"{recipe}: (recipe, run) {differ}"
    assert ran["model.tensor_model_parallel_size"] == shipped["model.tensor_model_parallel_size"]


def test_cpu_overrides_are_the_documented_ones():
    """docs/cpu_mode.md's table of CPU-only overrides lists exactly recipes/cpu_overrides.yaml."""
    documented = dict(re.findall(r"^\| `([a-z_.]+)` \| `([^`]+)` \|", (REPO / "docs" / "cpu_mode.md").read_text(), re.M))
    assert documented == dict(o.split("=", 1) for o in cpu_overrides())
    assert documented  # the table is there


# --- pretrain_llama32_1b: TP 1, 2 processes ---------------------------------------------------------

PT_1B = "pretrain_llama32_1b"
# micro-batch 1: the recipe's 4 x data-parallel 2 would exceed the toy global batch of 4.
PT_1B_SIZES = ("train.micro_batch_size=1", "speechlm.keep_last=2")


@pytest.fixture(scope="module")
def pt_1b_run(expanded_tiny_dir, converted_tiny_dir, synthetic_blend, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt-1b")
    args = _args(PT_1B, expanded_tiny_dir, synthetic_blend, out / "ckpt", converted_tiny_dir,
                 *_sizes(20, 10, 5, *PT_1B_SIZES, "speechlm.pinned=[5]"))
    return out / "ckpt", _run(2, args, out / "log.txt"), args


def test_1b_loss_falls_and_everything_is_logged(pt_1b_run):
    ckpt, log, _ = pt_1b_run
    losses = _losses(log)
    assert sorted(losses) == list(range(1, 21))
    # At the recipe's LR (1.5e-4, 2 warm-up steps) a random tiny model moves little in 20 steps:
    # measured 12.19 -> 12.06 (first vs last three); the smoke recipe's LR 3e-3 gave more than 1.0.
    assert np.mean([losses[i] for i in (18, 19, 20)]) < np.mean([losses[i] for i in (1, 2, 3)]) - 0.05, losses
    assert _losses(log, "speech loss") and _losses(log, "text loss")  # the loss split by target kind
    assert re.search(r"tokens/s/GPU [0-9,]+ \| MFU", log)
    held_out = _per_set(log)
    assert sorted(held_out) == sorted(SETS), held_out
    for name in SETS:  # each held-out set on its own, on the same samples each time: it falls
        assert held_out[name][20] < held_out[name][10], (name, held_out[name])
        # Evaluated once at the last iteration: Bridge's repeat after training is skipped.
        assert log.count(f"validation {name} at iteration 20 |") == 1, name
    assert "validation at iteration 20 already done: not repeated after training" in log
    assert "on validation set" not in log
    tags = _tensorboard_tags(ckpt.parent / "tensorboard")
    for name in SETS:
        assert f"validation/{name} lm loss" in tags and f"validation/{name} ppl" in tags, sorted(tags)
    for tag in ("lm loss", "speech loss", "text loss", "learning-rate", "grad-norm",
                "throughput/tokens_per_sec_per_gpu", "throughput/mfu", "memory/max_allocated_gib"):
        assert tag in tags, (tag, sorted(tags))


def test_1b_checkpoints_are_retained_by_rule_and_record_provenance(pt_1b_run, synthetic_blend, expanded_tiny_dir):
    from speechlm.data.blend_file import load
    from speechlm.token_layout import TokenLayout

    ckpt, _, args = pt_1b_run
    # saved at 5, 10, 15, 20 (asynchronously, as shipped); keep the last 2 plus pinned 5
    assert checkpoints.saved_iterations(ckpt) == [5, 15, 20]
    prov = json.loads((ckpt / "iter_0000020" / "provenance.json").read_text())
    assert prov["iteration"] == 20
    assert prov["layout_hash"] == TokenLayout.load(expanded_tiny_dir).layout_hash
    assert prov["blend"]["sha256"] == load(synthetic_blend).sha256
    assert prov["packages"]["megatron-bridge"] == "0.6.2" and prov["git_commit"]
    assert prov["recipe"]["train"]["global_batch_size"] == 4
    assert prov["recipe"]["optimizer"]["lr"] == 1.5e-4  # the recipe's own
    _assert_ran_as_shipped(PT_1B, args, ckpt / "iter_0000020")


def _index_cache(ckpt: Path) -> dict[str, int]:
    """The files of a run's index cache (the recipe's dataset.path_to_cache) and their mtimes."""
    return {p.name: p.stat().st_mtime_ns for p in (ckpt / "index_cache").iterdir()}


def test_1b_indices_are_cached_where_the_recipe_says(pt_1b_run, synthetic_blend):
    """Megatron builds every dataset's and the blend's indices into dataset.path_to_cache (the
    recipe's `${checkpoint.save}/index_cache`, as the run's config records it), nothing beside the data."""
    from speechlm.data.blend_file import load

    ckpt = pt_1b_run[0]
    ran = yaml.safe_load((ckpt / "iter_0000020" / "run_config.yaml").read_text())
    assert ran["dataset"]["path_to_cache"] == str(ckpt / "index_cache")
    cached = _index_cache(ckpt)
    blend = load(synthetic_blend)
    train = [n for n in cached if n.endswith("-GPTDataset-train-document_index.npy")]
    assert len(train) == len(blend.train_prefixes), sorted(cached)
    assert any(n.endswith("-BlendedDataset-train-dataset_index.npy") for n in cached), sorted(cached)
    assert not [p for p in blend.train_prefixes if (Path(p) / "cache").exists()]  # megatron-core's default place


def test_1b_sigterm_checkpoints_and_exits_then_resume_reproduces(pt_1b_run, expanded_tiny_dir, converted_tiny_dir,
                                                                 synthetic_blend, tmp_path):
    reference = _losses(pt_1b_run[1])
    ckpt = tmp_path / "ckpt"
    args = _args(PT_1B, expanded_tiny_dir, synthetic_blend, ckpt, converted_tiny_dir, *_sizes(20, 10, 100, *PT_1B_SIZES))
    log = _run_until_sigterm(2, args, tmp_path / "run1.txt", 7)
    stopped_at = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert 7 <= stopped_at < 20 and max(_losses(log)) == stopped_at
    built = _index_cache(ckpt)

    resumed = _losses(_run(2, args, tmp_path / "run2.txt"))
    after = _index_cache(ckpt)  # the relaunch read the indices the first launch cached
    assert built and {name: after.get(name) for name in built} == built
    assert sorted(resumed) == list(range(stopped_at + 1, 21))
    # Same data order and state: the resumed run reproduces the uninterrupted one (fp32 on CPU;
    # only the order of floating-point reductions could differ).
    for i, loss in resumed.items():
        assert abs(loss - reference[i]) <= 1e-4, (i, loss, reference[i])


# --- sft_llama32_1b: TP 1, 2 processes, from the 1B row's checkpoint ---------------------------------

SFT_1B = "sft_llama32_1b"


def _sft_args(pt_1b_run, expanded_tiny_dir, synthetic_blend, ckpt) -> list[str]:
    # Starts from the pretraining row's save directory (its latest iteration, 20). Validation every
    # 5: Bridge sizes the held-out set for 5 evaluations, so a resume after 3 of them finds it used
    # up if the per-set evaluations count against it too (the SFT resume defect).
    return _args(SFT_1B, expanded_tiny_dir, synthetic_blend, ckpt, pt_1b_run[0], *_sizes(20, 5, 100))


@pytest.fixture(scope="module")
def sft_1b_run(pt_1b_run, expanded_tiny_dir, synthetic_blend, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-1b")
    args = _sft_args(pt_1b_run, expanded_tiny_dir, synthetic_blend, out / "ckpt")
    return out / "ckpt", _run(2, args, out / "log.txt"), args


def test_sft_lowers_heldout_speech_loss(sft_1b_run):
    ckpt, log, args = sft_1b_run
    assert "packed TTS train: 300 pairs" in log and "packed TTS valid: 40 pairs" in log
    # SFT's LR 1.5e-5 is the pretraining row's final LR, read from its checkpoint's provenance.json.
    assert "differs from the pretraining run's final LR" not in log
    losses, held_out = _losses(log), _per_set(log)
    assert sorted(losses) == list(range(1, 21)) and sorted(held_out) == ["tts/hi"], held_out
    assert sorted(held_out["tts/hi"]) == [5, 10, 15, 20], held_out
    # The same held-out pairs each time. At the recipe's LR 1.5e-5 it moves little in 20 steps
    # (measured 12.0595 -> 12.0538); the smoke recipe's LR 3e-3 brought it > 0.5 below iteration 1's loss.
    assert held_out["tts/hi"][20] < held_out["tts/hi"][10], held_out
    # Through the attributed pass (speechlm.train.validation), as in pretraining: a standard error beside each loss.
    assert re.search(r"validation tts/hi at iteration 20 \| lm loss: \S+ \| stderr: [0-9.E+-]+ \| ppl", log), log[-3000:]
    assert (ckpt / "iter_0000020" / "provenance.json").is_file()
    _assert_ran_as_shipped(SFT_1B, args, ckpt / "iter_0000020")


def test_sft_sigterm_then_resume_reproduces(sft_1b_run, pt_1b_run, expanded_tiny_dir, synthetic_blend, tmp_path):
    """Stopped after three validations (5, 10, 15), resumed: reproduces the uninterrupted run."""
    reference = _losses(sft_1b_run[1])
    ckpt = tmp_path / "ckpt"
    args = _sft_args(pt_1b_run, expanded_tiny_dir, synthetic_blend, ckpt)
    log = _run_until_sigterm(2, args, tmp_path / "run1.txt", 16)
    stopped_at = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert 16 <= stopped_at < 20 and max(_losses(log)) == stopped_at

    log2 = _run(2, args, tmp_path / "run2.txt")
    resumed = _losses(log2)
    assert sorted(resumed) == list(range(stopped_at + 1, 21))  # resumed, not re-initialised from the start
    for i, loss in resumed.items():
        assert abs(loss - reference[i]) <= 1e-4, (i, loss, reference[i])
    assert abs(_per_set(log2)["tts/hi"][20] - _per_set(sft_1b_run[1])["tts/hi"][20]) <= 1e-4


# --- pretrain_llama32_3b (TP 2) and pretrain_llama31_8b (TP 4): only the steps they need ----------------


def _stop_and_resume(recipe: str, nproc: int, model, start, blend, out: Path) -> dict:
    """4 iterations, validation every 2: stop at 2 (train.exit_interval, checkpoint), resume to 4."""
    ckpt = out / "ckpt"
    args = _args(recipe, model, blend, ckpt, start, *_sizes(4, 2, 2))
    first = _run(nproc, [*args, "train.exit_interval=2"], out / "run1.txt")
    stopped = checkpoints.saved_iterations(ckpt)
    second = _run(nproc, args, out / "run2.txt")
    return dict(ckpt=ckpt, args=args, first=first, second=second, stopped=stopped)


def _assert_stopped_and_resumed(row: dict, recipe: str) -> None:
    first, second, ckpt = row["first"], row["second"], row["ckpt"]
    assert sorted(_losses(first)) == [1, 2] and "exiting program at iteration 2" in first, first[-3000:]
    assert row["stopped"] == [2]
    assert f"loading distributed checkpoint from {ckpt} at iteration 2" in second  # its own, not the start
    assert sorted(_losses(second)) == [3, 4]
    # Per-set validation at this TP, before the stop and after the resume (speechlm.train.validation).
    for log, it in ((first, 2), (second, 4)):
        held_out = _per_set(log)
        assert sorted(held_out) == sorted(SETS) and all(it in held_out[s] for s in SETS), held_out
    assert checkpoints.saved_iterations(ckpt) == [2, 4]
    _assert_ran_as_shipped(recipe, row["args"], ckpt / "iter_0000004")


@pytest.fixture(scope="module")
def row_3b(expanded_tiny_dir, converted_tiny_dir, synthetic_blend, tmp_path_factory):
    return _stop_and_resume("pretrain_llama32_3b", 2, expanded_tiny_dir, converted_tiny_dir, synthetic_blend,
                            tmp_path_factory.mktemp("pt-3b"))


def test_3b_at_tp2_validates_per_set_checkpoints_stops_and_resumes(row_3b, pt_1b_run):
    _assert_stopped_and_resumed(row_3b, "pretrain_llama32_3b")
    # The TP 1 converted checkpoint loads sharded at TP 2: iteration 1 (before any update, the same
    # 4 samples) has the 1B row's loss.
    assert abs(_losses(row_3b["first"])[1] - _losses(pt_1b_run[1])[1]) <= 1e-4


@pytest.fixture(scope="module")
def row_8b(expanded_tiny_8b_dir, converted_tiny_8b_dir, synthetic_blend, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt-8b")
    row = _stop_and_resume("pretrain_llama31_8b", 4, expanded_tiny_8b_dir, converted_tiny_8b_dir, synthetic_blend, out)
    # fp32: the run trained in fp32 (CPU), so the export is checked at fp32's tolerance, not bf16's.
    row["export"] = subprocess.run(
        [sys.executable, "conversion/megatron_to_hf.py", "--input", str(row["ckpt"]), "--output", str(out / "hf"),
         "--verify", "--dtype", "fp32"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    row["hf"] = out / "hf"
    return row


def test_8b_at_tp4_validates_per_set_checkpoints_stops_resumes_and_exports(row_8b):
    from speechlm.model.conversion import padded_vocab_size
    from speechlm.token_layout import VOCAB_SIZE

    _assert_stopped_and_resumed(row_8b, "pretrain_llama31_8b")
    export = row_8b["export"]
    assert export.returncode == 0, export.stderr[-4000:]
    assert re.search(r"verify: .*: PASS", export.stdout), export.stdout
    # The export strips exactly the vocabulary padding the TP 4 run trained with.
    model = yaml.safe_load((row_8b["ckpt"] / "iter_0000004" / "run_config.yaml").read_text())["model"]
    padded = (padded_vocab_size(VOCAB_SIZE, model["make_vocab_size_divisible_by"], model["tensor_model_parallel_size"])
              if model["should_pad_vocab"] else VOCAB_SIZE)
    assert f"{padded - VOCAB_SIZE} padded vocabulary rows stripped" in export.stdout, export.stdout
    config = json.loads((row_8b["hf"] / "config.json").read_text())
    assert config["vocab_size"] == VOCAB_SIZE and config["tie_word_embeddings"] is False
    assert "iteration 4" in export.stdout
