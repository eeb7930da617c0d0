"""The GPU acceptance check: every GPU-only path this machine has the packages for, figures into
docs/gpu.md. Called by `bash bench/gpu_check.sh` (which installs brought wheels first); see docs/gpu.md.

    python bench/gpu_check.py [--out docs/gpu.md] [--workdir DIR] [--iters N] [--only a,b] [--dry-run]

Steps (each runs in its own process, with a time limit; one that cannot run here says why):
  pretrain     our 1B recipe, bf16, 1 GPU: tokens/s/GPU and MFU; TE layer spec where TE is installed,
               else the local spec. Also async save with retention (keep_last 1) and provenance.
  bridge_stock Bridge's llama32_1b_pretrain_1gpu_h100_bf16_config() at our shapes, same figures (TE)
  tp2_sp       our recipe at TP 2 with sequence parallel (2 GPUs)
  sft_thd      packed THD SFT steps through TE attention (bench/sft_packed_gpu_check.py) (TE)
  export       conversion/megatron_to_hf.py --verify of the pretrain checkpoint, on the GPU
  synthesize   python -m speechlm.synthesize --batch on the export, bf16
  vllm         greedy generation of the export by vLLM vs transformers (vLLM)
The model is the Llama-3.2-1B architecture with the 193,792-token vocabulary and random weights;
the data a synthetic blend: the figures are speeds and agreements, not model quality.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
STEPS = ("pretrain", "bridge_stock", "tp2_sp", "sft_thd", "export", "synthesize", "vllm")
BEGIN, END = "<!-- gpu_check: begin -->", "<!-- gpu_check: end -->"
THROUGHPUT = re.compile(r"tokens/s/GPU ([0-9,]+) \| MFU ([0-9.]+) %")


def probe() -> dict:
    """What this machine has: GPUs and the optional packages (no CUDA initialisation beyond a count)."""
    import torch

    have = {m: importlib.util.find_spec(m) is not None for m in ("transformer_engine", "flash_attn", "vllm")}
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"gpus": gpus, "gpu_name": torch.cuda.get_device_name(0) if gpus else None, "torch": torch.__version__, **have}


def plan(env: dict, only: list[str]) -> dict[str, str | None]:
    """step -> None (runs) or the reason it cannot run here."""
    needs = {"bridge_stock": "transformer_engine", "sft_thd": "transformer_engine", "vllm": "vllm"}
    reasons = {}
    for step in STEPS:
        reason = None
        if only and step not in only:
            reason = "not selected (--only)"
        elif not env["gpus"]:
            reason = "no CUDA GPU"
        elif step in needs and not env[needs[step]]:
            reason = f"{needs[step]} is not installed"
        elif step == "tp2_sp" and env["gpus"] < 2:
            reason = f"needs 2 GPUs, this machine has {env['gpus']}"
        elif step in ("export", "synthesize", "vllm") and "pretrain" in reasons and reasons["pretrain"]:
            reason = "needs the pretrain step's checkpoint"
        reasons[step] = reason
    return reasons


# --- inputs ----------------------------------------------------------------------------------------


def make_inputs(work: Path) -> tuple[Path, Path]:
    """A 1B-shaped model dir (config, expanded tokenizer, token layout; no weights) and a synthetic blend."""
    import numpy as np

    from bench.bridge_recipe_diff import write_1b_config_dir
    from speechlm.demo import tiny
    from speechlm.data.blend_file import Blend
    from speechlm.token_layout import TokenLayout
    from speechlm.model.vocab_expansion import expand_vocab

    model = write_1b_config_dir(work / "llama32-1b-shaped")
    expanded = expand_vocab(tiny.make_tiny_llama(work / "tiny"), work / "tiny-expanded").output
    for f in expanded.iterdir():  # the expanded tokenizer: what synthesis and the export need
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(f, model / f.name)

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    layout, rng = TokenLayout.load(model), np.random.default_rng(0)
    prefixes = {}
    for split, docs in (("train", 3000), ("valid", 200)):
        prefix = str(work / "data" / f"audio_{split}")
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
        for _ in range(docs):
            doc = layout.audio_document(rng.integers(0, 65_536, size=int(rng.integers(200, 1500))))
            builder.add_document(doc, [len(doc)])
        builder.finalize(prefix + ".idx")
        prefixes[split] = prefix
    blend = Blend(layout_hash=layout.layout_hash, train_prefixes=[prefixes["train"]], train_weights=[1.0],
                  validation={"audio/xx": prefixes["valid"]}, planned_tokens=0,
                  datasets=[{"name": "audio/xx", "kind": "audio", "language": "xx", "prefix": prefixes["train"], "tokens": 0}])
    return model, blend.write(work / "data" / "blend.yaml")


# --- running ---------------------------------------------------------------------------------------


def run(cmd: list[str], log: Path, timeout: int) -> tuple[int, str, float]:
    started = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4"), "HF_HUB_OFFLINE": "1"}
    try:
        with open(log, "w") as out:
            rc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    return rc, log.read_text(errors="replace"), time.time() - started


def torchrun(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone", *args]


def throughput(log: str, skip: int = 3) -> dict:
    rows = [(float(t.replace(",", "")), float(m)) for t, m in THROUGHPUT.findall(log)][skip:]
    if not rows:
        return {}
    return {"tokens/s/GPU": round(statistics.median(r[0] for r in rows)), "MFU %": round(statistics.median(r[1] for r in rows), 1)}


def _train_args(model: Path, blend: Path, ckpt: Path, a, *extra: str) -> list[str]:
    tb = [] if importlib.util.find_spec("tensorboard") else ["logger.tensorboard_dir=null"]
    return ["-m", "speechlm.train", "--config", "recipes/pretrain_llama32_1b.yaml", f"speechlm.hf_model={model}",
            f"speechlm.blend={blend}", f"checkpoint.save={ckpt}", "speechlm.from_scratch=true", f"train.train_iters={a.iters}",
            f"train.global_batch_size={a.global_batch}", f"train.micro_batch_size={a.micro_batch}",
            "validation.eval_interval=100000", "dataset.num_workers=2", *tb, *extra]


def step_pretrain(a, work, model, blend, env) -> dict:
    # Two saves, keep the last: retention must delete the first. A 1B checkpoint with its
    # distributed-optimizer state is ~19 GB, so no more than two ever exist at once.
    ckpt, every = work / "ckpt", a.iters // 2
    rc, log, secs = run(torchrun(1, _train_args(model, blend, ckpt, a, f"speechlm.checkpoint_schedule=[[null,{every}]]",
                                                 "speechlm.keep_last=1", "checkpoint.async_save=true")),
                        work / "pretrain.log", a.step_timeout)
    from speechlm.train import checkpoints

    kept = checkpoints.saved_iterations(ckpt)
    want = [a.iters]

    def durable_first(i: int) -> bool:  # provenance written once the torch_dist save had finished
        d = ckpt / f"iter_{i:07d}"
        prov, meta = d / "provenance.json", d / ".metadata"
        return prov.is_file() and meta.is_file() and prov.stat().st_mtime >= meta.stat().st_mtime

    durable = bool(kept) and all(durable_first(i) for i in kept)
    figures = {"layer spec": "TE" if env["transformer_engine"] else "local (no TE)", **throughput(log),
               "checkpoints kept": kept, "expected": want, "provenance after save": durable}
    ok = rc == 0 and kept == want and durable and "tokens/s/GPU" in figures
    return {"ok": ok, "rc": rc, "seconds": secs, "figures": figures, "log": "pretrain.log"}


def step_bridge_stock(a, work, model, blend, env) -> dict:
    rc, log, secs = run(torchrun(1, [__file__, "--stock-worker", str(model), "--iters", str(a.iters),
                                     "--global-batch", str(a.global_batch), "--micro-batch", str(a.micro_batch)]),
                        work / "bridge_stock.log", a.step_timeout)
    figures = throughput(log)
    return {"ok": rc == 0 and bool(figures), "rc": rc, "seconds": secs, "figures": figures, "log": "bridge_stock.log"}


def stock_worker(model: str, iters: int, global_batch: int, micro_batch: int) -> None:
    """Bridge's own H100 recipe, mock data, no checkpoints, our throughput callback (in torchrun)."""
    from speechlm.train import megatron_env  # noqa: F401  (before any megatron.bridge import)
    from bench.bridge_recipe_diff import bridges  # noqa: I001
    from megatron.bridge.training import gpt_step
    from megatron.bridge.training.pretrain import pretrain

    from speechlm.train.metrics import ThroughputMetrics

    cfg = bridges(Path(model), 2048)
    cfg.train.train_iters, cfg.train.global_batch_size, cfg.train.micro_batch_size = iters, global_batch, micro_batch
    cfg.scheduler.lr_warmup_iters, cfg.scheduler.lr_decay_iters = 1, iters
    cfg.checkpoint.save = cfg.checkpoint.load = None
    cfg.checkpoint.save_interval, cfg.validation.eval_interval, cfg.logger.log_interval = None, 100000, 1
    pretrain(cfg, gpt_step.forward_step, callbacks=[ThroughputMetrics(989.0, 1)])


def step_tp2_sp(a, work, model, blend, env) -> dict:
    rc, log, secs = run(torchrun(2, _train_args(model, blend, work / "ckpt_tp2", a, "model.tensor_model_parallel_size=2",
                                                 "model.sequence_parallel=true", "speechlm.checkpoint_schedule=[[null,100000]]")),
                        work / "tp2_sp.log", a.step_timeout)
    shutil.rmtree(work / "ckpt_tp2", ignore_errors=True)  # its final save: disk, not a figure
    figures = throughput(log)
    return {"ok": rc == 0 and bool(figures), "rc": rc, "seconds": secs, "figures": figures, "log": "tp2_sp.log"}


def step_sft_thd(a, work, model, blend, env) -> dict:
    rc, log, secs = run([sys.executable, "bench/sft_packed_gpu_check.py"], work / "sft_thd.log", a.step_timeout)
    match = re.search(r"\{.*\}", log, re.S)
    figures = json.loads(match[0]) if match else {}
    return {"ok": rc == 0, "rc": rc, "seconds": secs, "figures": figures, "log": "sft_thd.log"}


def step_export(a, work, model, blend, env) -> dict:
    rc, log, secs = run([sys.executable, "conversion/megatron_to_hf.py", "--input", str(work / "ckpt"), "--output",
                         str(work / "export"), "--verify", "--hf-source", str(model), "--overwrite"],
                        work / "export.log", a.step_timeout)
    shutil.rmtree(work / "ckpt", ignore_errors=True)  # the export is what the later steps use
    diffs = re.findall(r"max abs[^0-9]*([0-9.eE+-]+)", log)
    return {"ok": rc == 0, "rc": rc, "seconds": secs, "figures": {"max abs logit diff": diffs[-1] if diffs else "?"}, "log": "export.log"}


def step_synthesize(a, work, model, blend, env) -> dict:
    items = work / "items.jsonl"
    items.write_text("".join(json.dumps({"id": f"u{i}", "text": f"sentence number {i} to speak", "language": "en"}) + "\n"
                             for i in range(16)))
    rc, log, secs = run([sys.executable, "-m", "speechlm.synthesize", "--model", str(work / "export"), "--batch", str(items),
                         "--out", str(work / "synth"), "--max-new-tokens", "200", "--batch-size", "16", "--temperature", "0"],
                        work / "synthesize.log", a.step_timeout)
    summary = work / "synth" / "summary.json"
    figures = {"items": 16, "seconds": round(secs, 1)}
    if summary.is_file():
        figures["summary"] = json.loads(summary.read_text()).get("totals", "see summary.json")
    return {"ok": rc == 0 and summary.is_file(), "rc": rc, "seconds": secs, "figures": figures, "log": "synthesize.log"}


def step_vllm(a, work, model, blend, env) -> dict:
    rc, log, secs = run([sys.executable, __file__, "--vllm-worker", str(work / "export")], work / "vllm.log", a.step_timeout)
    match = re.search(r"VLLM_RESULT (\{.*\})", log)
    figures = json.loads(match[1]) if match else {}
    return {"ok": rc == 0 and figures.get("identical", 0) == figures.get("prompts", -1), "rc": rc, "seconds": secs,
            "figures": figures, "log": "vllm.log"}


def vllm_worker(export: str, new_tokens: int = 32) -> None:
    """Greedy continuations of a few TTS prompts: vLLM vs transformers, both bf16."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from speechlm.token_layout import TokenLayout

    tok, layout = AutoTokenizer.from_pretrained(export), TokenLayout.load(export)
    prompts = [layout.tts_prompt(tok(t, add_special_tokens=False)["input_ids"]).tolist()
               for t in ("hello world", "a second sentence", "numbers one two three", "the last prompt")]
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.bfloat16).cuda().eval()
    ref = [hf.generate(torch.tensor([p]).cuda(), max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)[0, len(p):].tolist()
           for p in prompts]
    del hf
    torch.cuda.empty_cache()
    llm = LLM(model=export, dtype="bfloat16", gpu_memory_utilization=0.5, enforce_eager=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True))
    got = [list(o.outputs[0].token_ids) for o in outs]
    common = [next((i for i, (x, y) in enumerate(zip(r, g)) if x != y), min(len(r), len(g))) for r, g in zip(ref, got)]
    print("VLLM_RESULT " + json.dumps({"prompts": len(prompts), "identical": sum(r == g for r, g in zip(ref, got)),
                                       "common prefix (tokens)": common, "new tokens": new_tokens}))


# --- report ----------------------------------------------------------------------------------------


def render(env: dict, results: dict, reasons: dict, dry_run: bool) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [BEGIN, f"Last `bash bench/gpu_check.sh{' --dry-run' if dry_run else ''}`: {when}; GPUs: {env['gpus']}"
             f"{' x ' + env['gpu_name'] if env['gpu_name'] else ''}; torch {env['torch']}; "
             + ", ".join(f"{k} {'yes' if env[k] else 'no'}" for k in ("transformer_engine", "flash_attn", "vllm")), "",
             "| step | result | seconds | figures |", "|---|---|---|---|"]
    for step in STEPS:
        if reasons[step]:
            lines.append(f"| {step} | not run: {reasons[step]} | | |")
            continue
        r = results.get(step, {})
        result = "PASS" if r.get("ok") else f"FAIL (rc {r.get('rc')}, log {r.get('log')})"
        figures = "; ".join(f"{k}: {v}" for k, v in r.get("figures", {}).items())
        lines.append(f"| {step} | {result} | {r.get('seconds', 0):.0f} | {figures} |")
    lines.append(END)
    return "\n".join(lines)


def write_report(out: Path, block: str) -> None:
    """Replace the block between the markers in `out` (or write the block alone)."""
    text = out.read_text() if out.is_file() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = (text.rstrip() + "\n\n" if text else "") + block + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bash bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "gpu.md", help="markdown file for the figures (default docs/gpu.md)")
    p.add_argument("--workdir", type=Path, help="where models, checkpoints and logs go (default: a temp dir, kept)")
    p.add_argument("--logs", type=Path, help="also copy each step's log here (e.g. a device session's $OUT)")
    p.add_argument("--iters", type=int, default=12, help="training iterations per run (default 12)")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--step-timeout", type=int, default=900, help="seconds one step may take (default 900)")
    p.add_argument("--only", default="", help=f"comma-separated steps of: {', '.join(STEPS)}")
    p.add_argument("--dry-run", action="store_true", help="say what would run here and why not; run nothing")
    p.add_argument("--stock-worker", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--vllm-worker", metavar="EXPORT", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.stock_worker:
        stock_worker(a.stock_worker, a.iters, a.global_batch, a.micro_batch)
        return 0
    if a.vllm_worker:
        vllm_worker(a.vllm_worker)
        return 0
    only = [s for s in a.only.split(",") if s]
    unknown = sorted(set(only) - set(STEPS))
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}")
    if a.iters < 4 or a.global_batch % a.micro_batch:
        p.error("--iters must be >= 4 and --global-batch a multiple of --micro-batch")

    env = probe()
    reasons = plan(env, only)
    if not env["gpus"] and not a.dry_run:
        print("gpu_check: no CUDA GPU here; `bash bench/gpu_check.sh --dry-run` shows what a GPU machine would run", file=sys.stderr)
        return 2
    results = {}
    if not a.dry_run:
        work = a.workdir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
        work.mkdir(parents=True, exist_ok=True)
        print(f"gpu_check: work dir {work}")
        model, blend = make_inputs(work)
        for step in STEPS:
            if reasons[step]:
                print(f"gpu_check: {step}: not run ({reasons[step]})")
                continue
            results[step] = globals()[f"step_{step}"](a, work, model, blend, env)
            if a.logs and (work / results[step]["log"]).is_file():
                a.logs.mkdir(parents=True, exist_ok=True)
                shutil.copy(work / results[step]["log"], a.logs / results[step]["log"])
            print(f"gpu_check: {step}: {'PASS' if results[step]['ok'] else 'FAIL'} {json.dumps(results[step]['figures'])}")
            # The report so far, so that an outer time limit still leaves the finished steps' figures.
            so_far = {s: reasons[s] or (None if s in results else "not reached: the run was stopped first") for s in STEPS}
            write_report(a.out, render(env, results, so_far, False))
    block = render(env, results, reasons, a.dry_run)
    write_report(a.out, block)
    print(block)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
