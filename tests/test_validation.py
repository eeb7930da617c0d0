"""Per-set validation in one attributed pass (speechlm.train.validation, issue 19).

The statistics and sizes are checked without Megatron; one short real run (bench/validation_overhead.py
--checks on conftest's tiny model and synthetic blend, 2 processes, 20 steps, validation at 10 and 20)
runs today's per-set evaluation (`@each`), the new pass at its default size (untagged, what a
training run logs), the new pass on exactly the baseline's samples (`@same`) and on four times as
many (`@4x`), side by side.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

SETS = ("audio/hi", "audio/ta", "text/en", "tts/hi")  # conftest's synthetic blend
# The attributed pass on the baseline's samples: the same per-token losses, summed in another order
# (float64 per set vs float32 per micro-batch); measured differences ~1e-6.
AGREE = 1e-4
LINE = re.compile(r"validation (\S+) at iteration (\d+) \| lm loss: ([0-9.E+-]+) \| stderr: ([0-9.E+-]+) \| ppl: ([0-9.E+-]+)")


def _bench():
    spec = importlib.util.spec_from_file_location("validation_overhead", REPO / "bench" / "validation_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- without Megatron ------------------------------------------------------------------------------


def test_per_set_statistics_are_the_token_weighted_loss_and_the_standard_error():
    from speechlm.train.forward_step import PerSetAccumulator, per_set_results

    rng = np.random.default_rng(0)
    losses = rng.gamma(4.0, 1.0, size=(6, 16)).astype(np.float32)
    mask = (rng.random((6, 16)) < 0.7).astype(np.float32)
    mask[5] = 0  # a sample with no loss token is not a sample
    ids = np.array([0, 1, 0, 2, 0, 1])
    acc = PerSetAccumulator()
    acc.start(4)
    for rows in (slice(0, 3), slice(3, 6)):  # two micro-batches
        acc.add(torch.tensor(ids[rows]), torch.tensor(losses[rows]), torch.tensor(mask[rows]))
    results = per_set_results(acc.stop())
    assert acc.n_sets == 0 and results[3] is None  # set 3 had no sample
    for s, rows in ((0, [0, 2, 4]), (1, [1]), (2, [3])):
        r = results[s]
        loss = (losses[rows] * mask[rows]).sum() / mask[rows].sum()
        assert r["loss"] == pytest.approx(loss, rel=1e-6) and r["samples"] == len(rows)
        assert r["tokens"] == int(mask[rows].sum())
        means = (losses[rows] * mask[rows]).sum(1) / mask[rows].sum(1)
        if len(rows) > 1:
            assert r["stderr"] == pytest.approx(means.std(ddof=1) / math.sqrt(len(rows)), rel=1e-5)
        else:
            assert math.isnan(r["stderr"])  # one sample: no standard error


def test_standard_error_is_positive_and_shrinks_with_more_samples():
    from speechlm.train.forward_step import PerSetAccumulator, per_set_results

    rng = np.random.default_rng(1)
    errors = {}
    for n in (16, 256):
        acc = PerSetAccumulator()
        acc.start(1)
        acc.add(torch.zeros(n, dtype=torch.long), torch.tensor(rng.normal(3.0, 0.5, (n, 32)), dtype=torch.float32),
                torch.ones(n, 32))
        errors[n] = per_set_results(acc.stop())[0]["stderr"]
    assert 0 < errors[256] < errors[16] / 2.5, errors  # 1/sqrt(16): about 4x smaller


def test_the_1b_recipe_validates_50_sets_in_under_2_percent():
    a = _bench().recipe_overhead("pretrain_llama32_1b.yaml", n_sets=50)
    assert a["new_ratio"] < 0.02, a
    assert a["new_per_set"] >= 100, a  # each set's loss from about a hundred 2,048-token sequences
    assert a["baseline_ratio"] > 5 * a["new_ratio"], a  # the same sizes, each set on its own
    # 20 x 256 = 5,120 for Bridge's blend, the same again split over the sets, per 1,000 x 256 trained.
    assert (a["bridge_eval_sequences"], a["new_sequences"], a["train_sequences"]) == (5_120, 10_240, 256_000), a


# --- one real run: the baseline and the new pass side by side ----------------------------------------


@pytest.fixture(scope="module")
def bench_run(expanded_tiny_dir, synthetic_blend, tmp_path_factory):
    out = tmp_path_factory.mktemp("validation-bench")
    proc = subprocess.run([sys.executable, "bench/validation_overhead.py", "--model", str(expanded_tiny_dir),
                           "--blend", str(synthetic_blend), "--iters", "20", "--eval-interval", "10", "--eval-iters", "2",
                           "--checks", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = (out / "log.txt").read_text() if (out / "log.txt").is_file() else ""
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:] + log[-4000:]
    return json.loads((out / "result.json").read_text()), log, proc.stdout, out



@pytest.mark.slow
def test_attributed_losses_agree_with_the_per_set_evaluation_on_the_same_samples(bench_run):
    result, _, _, _ = bench_run
    each, same = result["results"]["each"], result["results"]["same"]
    # Baseline: eval_iters 2 x global batch 4 per set; the default pass splits those 8 over the 4 sets.
    assert result["per_set_samples"] == {"each": 8, "new": 2, "same": 8, "4x": 32}, result["per_set_samples"]
    assert sorted(each) == sorted(same) == ["10", "20"]
    for step in each:
        assert sorted(each[step]) == sorted(same[step]) == sorted(SETS), (each[step], same[step])
        for name in SETS:
            assert abs(same[step][name]["loss"] - each[step][name]["loss"]) <= AGREE, (step, name, each, same)
            assert same[step][name]["samples"] == 8
    # The sets differ from one another by far more than the tolerance: a swapped attribution would show.
    losses = [each["20"][n]["loss"] for n in SETS]
    assert max(losses) - min(losses) > 100 * AGREE, losses


@pytest.mark.slow
def test_standard_errors_are_positive_and_shrink_with_four_times_the_samples(bench_run):
    result = bench_run[0]["results"]
    ratios = []
    for step in ("10", "20"):
        for name in SETS:
            for key in ("new", "same", "4x"):
                assert result[key][step][name]["stderr"] > 0, (key, step, name)
            ratios.append(result["4x"][step][name]["stderr"] / result["same"][step][name]["stderr"])
    # 1/sqrt(4) = 0.5 for independent samples; the tiny held-out sets repeat samples at 32 a set.
    assert np.mean(ratios) < 0.85, ratios


@pytest.mark.slow
def test_the_run_logs_what_the_demo_reads_and_tensorboard(bench_run):
    from speechlm.demo.pipeline import read_losses

    _, log, stdout, out = bench_run
    for step in (10, 20):
        found = {m[0]: m for m in LINE.findall(log) if m[1] == str(step)}
        assert set(SETS) <= set(found), (step, sorted(found))
    assert sorted(s for s in read_losses(out / "log.txt")["validation"] if "@" not in s) == sorted(SETS)
    assert "validation at iteration 20 already done" in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for root, _, files in os.walk(out / "tensorboard"):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            tags |= set(acc.Tags()["scalars"])
    for name in SETS:
        for what in ("lm loss", "stderr", "ppl"):
            assert f"validation/{name} {what}" in tags, (name, what, sorted(tags))
    # The benchmark's report: both schemes' ratio and the 50-set arithmetic.
    assert re.search(r"baseline .* -> [0-9.]+ %", stdout) and re.search(r"new .* -> [0-9.]+ %", stdout), stdout
    assert "50 sets, 1B recipe" in stdout


@pytest.mark.slow
def test_one_pass_costs_less_than_one_evaluation_per_set(bench_run):
    s = bench_run[0]["seconds"]
    # The default pass reads 2 samples a set, the baseline 8 a set in 4 evaluations (measured 0.6 s vs 2.8 s).
    assert 0 < s["new"] < s["each"] / 2, s
