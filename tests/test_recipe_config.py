"""The recipe -> ConfigContainer path applies what the recipe says (issue 15): weight decay, a run
that would start from random weights, the blend's planned tokens against the run's, misspelled
keys, and the effective settings the dry run prints (read from built Megatron objects); the 1B
recipe sized for a cluster, recipes that cannot work, and SFT's check of the pretraining
checkpoint's token layout.

Every case is a dry run; all of them run in one subprocess (tests/workers/recipe_config.py), so
that this pytest process never switches on the CPU mode and the Megatron import is paid once.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from speechlm.train.recipe import load_recipe
from speechlm.token_layout import TokenLayout

RECIPES = REPO / "recipes"
SMOKE_TOKENS = 20 * 4 * 64  # smoke.yaml: train_iters x global_batch_size x seq_length

# Llama-3.x architectures (config.json only, no weights) with the expanded tokenizer.
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}

# name: (recipe, model shape, world size, plan for the GPU path)
EFFECTIVE = {
    "pretrain_llama32_1b": ("pretrain_llama32_1b.yaml", "1b", 8, True),
    "pretrain_llama32_3b": ("pretrain_llama32_3b.yaml", "3b", 16, True),
    "pretrain_llama31_8b": ("pretrain_llama31_8b.yaml", "8b", 32, True),
    "sft_llama32_1b": ("sft_llama32_1b.yaml", "1b", 8, True),
    "demo_pretrain": ("demo_pretrain.yaml", None, 2, False),
    "demo_sft": ("demo_sft.yaml", None, 2, False),
}


def _shaped(expanded: Path, out: Path, shape: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((expanded / "config.json").read_text())
    config.update(shape)
    (out / "config.json").write_text(json.dumps(config))
    for f in expanded.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("token_layout.json", "special_tokens_map.json", "generation_config.json"):
            shutil.copy(f, out / f.name)
    return out


def _blend_with_plan(synthetic_blend: Path, out: Path, planned_tokens: int) -> Path:
    raw = yaml.safe_load(synthetic_blend.read_text())
    raw["planned_tokens"] = planned_tokens
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def _pretraining_checkpoint(root: Path, layout_hash: str) -> Path:
    """A pretraining save directory as speechlm.train leaves it: tracker + iter_*/provenance.json."""
    (root / "iter_0000040").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("40")
    provenance = {"iteration": 40, "layout_hash": layout_hash, "recipe": {"optimizer": {"min_lr": 3.0e-4}}}
    (root / "iter_0000040" / "provenance.json").write_text(json.dumps(provenance))
    return root


def _cases(expanded_tiny_dir: Path, synthetic_blend: Path, tmp: Path) -> list[dict]:
    shaped = {k: _shaped(expanded_tiny_dir, tmp / f"llama-{k}", v) for k, v in SHAPES.items()}
    resumable = tmp / "resumable"  # a save directory with a checkpoint in it: the run resumes
    (resumable / "iter_0000010").mkdir(parents=True)
    (resumable / "latest_checkpointed_iteration.txt").write_text("10")
    # A misspelled key in the base of a base chain.
    (tmp / "typo_base.yaml").write_text(f"base: {RECIPES / 'smoke.yaml'}\nscheduler:\n  lr_decay_stlye: linear\n")
    (tmp / "typo_child.yaml").write_text("base: typo_base.yaml\ntrain:\n  train_iters: 10\n")

    def smoke(*extra, config="smoke.yaml", blend=synthetic_blend, start=True, save=None):
        return ["--config", str(RECIPES / config if "/" not in str(config) else config), "--dry-run", "--world-size", "2",
                f"speechlm.hf_model={expanded_tiny_dir}", f"speechlm.blend={blend}",
                f"checkpoint.save={save or tmp / 'fresh'}",
                *([f"checkpoint.pretrained_checkpoint={expanded_tiny_dir}"] if start else []), *extra]

    plan = lambda n: _blend_with_plan(synthetic_blend, tmp / f"blend-{n}.yaml", n)  # noqa: E731
    cases = {
        # 1: weight decay
        "wd_demo": smoke(config="demo_pretrain.yaml"),
        "wd_override": smoke("optimizer.weight_decay=0.05"),
        "wd_stated": smoke("scheduler.start_weight_decay=0.01", "scheduler.end_weight_decay=0.1",
                           "scheduler.weight_decay_incr_style=linear"),
        # 4: no starting weights
        "start_none": smoke(start=False),
        "start_from_scratch": smoke("speechlm.from_scratch=true", start=False),
        "start_resume": smoke(start=False, save=resumable),
        "start_contradiction": smoke("speechlm.from_scratch=true"),
        # 6: the blend's planned tokens against the run's
        "plan_equal": smoke(blend=plan(SMOKE_TOKENS)),
        "plan_10pct": smoke(blend=plan(round(SMOKE_TOKENS * 1.1))),
        "plan_3x": smoke(blend=plan(SMOKE_TOKENS * 3)),
        "plan_third": smoke(blend=plan(SMOKE_TOKENS // 3)),
        "plan_none": smoke(),
        "plan_sft_3x": smoke(config="sft_smoke.yaml", blend=plan(SMOKE_TOKENS * 3)),
        # 8: misspelled keys
        "typo_train": smoke("train.global_bach_size=64"),
        "typo_optimizer": smoke("optimizer.weight_decai=0.5"),
        "typo_model": smoke("model.tensor_parallel_size=2"),
        "typo_section": smoke("optimiser.lr=0.1"),
        "typo_ours": smoke("speechlm.warmup_fracton=0.2"),
        "typo_base_chain": smoke(config=tmp / "typo_child.yaml"),
        "wandb_project": smoke("logger.wandb_project=speechlm"),
    }
    # Sizing and refusals of the 1B recipe at cluster scale (the 1B architecture, no weights).
    def one_b(world: int, *extra: str) -> list[str]:
        return ["--config", str(RECIPES / "pretrain_llama32_1b.yaml"), "--dry-run", "--world-size", str(world),
                f"speechlm.hf_model={shaped['1b']}", f"speechlm.blend={synthetic_blend}",
                f"checkpoint.save={tmp / 'fresh'}", *extra]

    cases["sizes_1b"] = one_b(16, "speechlm.train_tokens=10000000000", "speechlm.from_scratch=true")
    cases["cannot_tp3"] = one_b(36, "model.tensor_model_parallel_size=3")
    cases["blend_missing"] = one_b(1, "speechlm.blend=/nonexistent/blend.yaml")
    # SFT from a pretraining checkpoint: its provenance's token layout must be the model's.
    ours, other = TokenLayout.load(expanded_tiny_dir).layout_hash, TokenLayout(language_tags=True).layout_hash
    for name, layout_hash in (("sft_same_layout", ours), ("sft_other_layout", other)):
        cases[name] = smoke(config="sft_smoke.yaml", start=False) + [
            f"checkpoint.pretrained_checkpoint={_pretraining_checkpoint(tmp / name, layout_hash)}"]
    cases["sft_same_layout_iter"] = smoke(config="sft_smoke.yaml", start=False) + [
        f"checkpoint.pretrained_checkpoint={tmp / 'sft_same_layout' / 'iter_0000040'}"]
    cases = [{"name": k, "argv": v} for k, v in cases.items()]
    for name, (recipe, shape, world, gpu) in EFFECTIVE.items():
        model = shaped[shape] if shape else expanded_tiny_dir
        cases.append({"name": name, "effective": True, "argv": [
            "--config", str(RECIPES / recipe), "--dry-run", "--world-size", str(world), *(["--gpu"] if gpu else []),
            f"speechlm.hf_model={model}", f"speechlm.blend={synthetic_blend}", f"checkpoint.save={tmp / 'fresh'}",
            f"checkpoint.pretrained_checkpoint={model}"]})
    return cases


@pytest.fixture(scope="module")
def results(expanded_tiny_dir, synthetic_blend, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("recipe-config")
    (tmp / "cases.json").write_text(json.dumps(_cases(expanded_tiny_dir, synthetic_blend, tmp)))
    proc = subprocess.run([sys.executable, "tests/workers/recipe_config.py", str(tmp / "cases.json"), str(tmp / "out.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text())


def _ok(r: dict) -> dict:
    assert r["rc"] == 0 and "error" not in r, (r.get("error") or r["stderr"])[-3000:]
    return r


def _refused(r: dict) -> str:
    assert r["rc"] not in (0, 2), r["stderr"][-3000:]  # refused with a message, not a traceback
    assert "Traceback" not in r["stderr"], r["stderr"][-3000:]
    return r["stderr"]


# --- 1: weight decay -----------------------------------------------------------------------------


def test_weight_decay_is_the_recipes(results):
    """Bridge's defaults schedule 0.033 and megatron-core's scheduler writes it into every group
    each step: the scheduler must carry the recipe's optimizer.weight_decay."""
    expected = {"plan_none": 0.1, "wd_demo": 0.0, "wd_override": 0.05}  # smoke = the 1B recipe's 0.1
    for name, wd in expected.items():
        r = _ok(results[name])
        assert r["optimizer_weight_decay"] == wd, (name, r)
        assert r["start_weight_decay"] == r["end_weight_decay"] == wd, (name, r)
        assert r["weight_decay_incr_style"] == "constant", (name, r)
    # A recipe that states the schedule itself keeps it.
    r = _ok(results["wd_stated"])
    assert (r["start_weight_decay"], r["end_weight_decay"], r["weight_decay_incr_style"]) == (0.01, 0.1, "linear"), r


# --- 4: a pretraining run needs starting weights ---------------------------------------------------


def test_pretraining_without_starting_weights_is_refused(results):
    err = _refused(results["start_none"])
    assert "checkpoint.pretrained_checkpoint" in err and "speechlm.from_scratch" in err, err
    _ok(results["start_from_scratch"])  # asked for explicitly
    _ok(results["start_resume"])  # a checkpoint to resume from in checkpoint.load
    err = _refused(results["start_contradiction"])
    assert "speechlm.from_scratch" in err and "checkpoint.pretrained_checkpoint" in err, err


def test_the_1b_recipe_states_from_scratch_false():
    assert load_recipe(RECIPES / "pretrain_llama32_1b.yaml").speechlm.from_scratch is False


# --- 6: the blend's planned tokens against the run's ----------------------------------------------


def test_planned_tokens_are_compared_with_the_run(results):
    assert "planned" not in _ok(results["plan_equal"])["stderr"]
    r = _ok(results["plan_10pct"])
    err = r["stderr"]
    assert "WARNING" in err and f"{round(SMOKE_TOKENS * 1.1):,}" in err and f"{SMOKE_TOKENS:,}" in err, err
    for name in ("plan_3x", "plan_third"):
        err = _refused(results[name])
        assert "planned_tokens" in err and f"{SMOKE_TOKENS:,}" in err, err
    # No plan recorded (a hand-written blend): nothing to compare, said in the dry run.
    r = _ok(results["plan_none"])
    assert "planned" not in r["stderr"] and "records no planned tokens" in r["stdout"], r["stdout"][-2000:]
    assert "planned" not in _ok(results["plan_sft_3x"])["stderr"]  # SFT packs every pair once per epoch


def _run_tokens(recipe: str) -> int:
    r = load_recipe(RECIPES / recipe)
    return r.train.global_batch_size * r.dataset.seq_length * r.train.train_iters


@pytest.mark.parametrize("mix, recipe", [("default_mix.yaml", "pretrain_llama32_1b.yaml"),
                                         ("demo_mix.yaml", "demo_pretrain.yaml")])
def test_the_example_mixes_plan_their_recipes_run(mix, recipe):
    planned = yaml.safe_load((RECIPES / "data" / mix).read_text())["planned_tokens"]
    assert planned == _run_tokens(recipe), (mix, planned, recipe, _run_tokens(recipe))


# --- 8: misspelled keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("case, wrong, right", [
    ("typo_train", "train.global_bach_size", "train.global_batch_size"),
    ("typo_optimizer", "optimizer.weight_decai", "optimizer.weight_decay"),
    ("typo_model", "model.tensor_parallel_size", "model.tensor_model_parallel_size"),
    ("typo_section", "optimiser", "optimizer"),
    ("typo_ours", "speechlm.warmup_fracton", "speechlm.warmup_fraction"),
    ("typo_base_chain", "scheduler.lr_decay_stlye", "scheduler.lr_decay_style"),
])
def test_a_misspelled_key_is_refused_naming_the_closest(results, case, wrong, right):
    err = _refused(results[case])
    assert f"unknown key {wrong}" in err and f"did you mean {right}?" in err, err


# --- 2: the effective settings ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EFFECTIVE))
def test_effective_settings_are_the_recipes(results, name):
    recipe_file, _, world, gpu = EFFECTIVE[name]
    recipe = load_recipe(RECIPES / recipe_file)
    r = _ok(results[name])
    e = r["effective"]
    wd, lr, min_lr = recipe.optimizer.weight_decay, recipe.optimizer.lr, recipe.optimizer.min_lr
    iters = recipe.train.train_iters
    tp = recipe.model.tensor_model_parallel_size
    assert "# effective settings" in r["stdout"]

    # Parameter groups as megatron-core's optimizer builds them, weight decay after a real
    # OptimizerParamScheduler step: the recipe's on matrices, none on norms (and biases).
    groups = e["param_groups"]
    assert sum(g["parameters"] for g in groups) > 0
    for g in groups:
        assert g["weight_decay_at_start"] == g["weight_decay_at_end"], g
        if g["ndims"] == [1]:
            assert g["weight_decay_at_start"] == 0.0, g
        else:
            assert 1 not in g["ndims"] and g["weight_decay_at_start"] == pytest.approx(wd), g
    assert {tuple(g["ndims"]) for g in groups} == {(1,), (2,)}
    assert e["scheduler"]["start_weight_decay"] == e["scheduler"]["end_weight_decay"] == pytest.approx(wd)

    warmup = round(recipe.speechlm.warmup_fraction * iters)
    assert e["lr"]["warmup_iters"] == warmup and e["lr"]["train_iters"] == iters
    assert e["lr"]["at_step_0"] == 0.0
    assert e["lr"]["at_end_of_warmup"] == pytest.approx(lr, rel=1e-9)
    assert e["lr"]["at_end"] == pytest.approx(min_lr, rel=1e-9)

    # Bridge keeps a model vocabulary that covers the tokenizer's unpadded (should_pad_vocab=False).
    v = e["vocabulary"]
    assert v["model"] == 193_792 and v["tensor_parallel"] == tp and v["padded"] % tp == 0
    multiple = v["divisible_by"] * tp
    assert v["padded"] == (math.ceil(193_792 / multiple) * multiple if v["should_pad"] else 193_792)

    m = e["model"]
    if gpu:  # the GPU path: TransformerEngine layers and the fused kernels
        assert m["transformer_impl"] == "transformer_engine" and m["layer_spec"] != "local_layer_spec", m
        assert m["fusions"]["bias_activation_fusion"] and m["fusions"]["masked_softmax_fusion"], m
    else:
        assert m["transformer_impl"] == "local" and m["layer_spec"] == "local_layer_spec", m
        assert not any(m["fusions"].values()), m


# --- the 1B recipe at cluster scale, and a recipe that cannot work -----------------------------------


def test_dry_run_sizes_the_1b_recipe(results):
    out = _ok(results["sizes_1b"])["stdout"]
    assert "ranks 16 = TP 1 x PP 1 x DP 16" in out
    assert "tokens per step 524,288" in out
    assert "steps 19,074 (warm-up 1,907)" in out  # ceil(1e10 / 524288), 10 %
    assert re.search(r"parameters \(B\)\s+1\.3[0-9]", out)  # 1.37 B with the 193,792-row tied embedding
    total = float(re.search(r"total\s+([0-9.]+)", out)[1])
    assert 10 < total < 80, out  # fits an 80 GB H100
    assert "audio/hi" in out and "epochs" in out


def test_a_recipe_that_cannot_work_fails_before_training(results):
    err = _refused(results["cannot_tp3"])
    assert "global_batch_size=256 is not divisible" in err
    assert "tensor_model_parallel_size=3 must divide the attention heads (32)" in err
    assert "blend file not found: /nonexistent/blend.yaml" in _refused(results["blend_missing"])


# --- SFT checks the pretraining checkpoint's token layout ------------------------------------------------


def test_sft_refuses_a_pretraining_checkpoint_of_another_layout(results, expanded_tiny_dir):
    _ok(results["sft_same_layout"])
    _ok(results["sft_same_layout_iter"])  # the iteration directory itself
    err = _refused(results["sft_other_layout"])
    ours, other = TokenLayout.load(expanded_tiny_dir).layout_hash, TokenLayout(language_tags=True).layout_hash
    assert "the SFT recipe cannot work" in err and other in err and ours in err, err
    assert re.search(r"sft_other_layout/iter_0000040", err), err


def test_wandb_logging_needs_wandb_installed(results):
    """wandb is not in requirements.lock (the NeMo container has it): asking for it without it
    installed is refused before training, not a traceback at the first log step."""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        err = _refused(results["wandb_project"])
        assert "logger.wandb_project='speechlm' needs wandb" in err and "pip install wandb" in err, err
    else:
        _ok(results["wandb_project"])
