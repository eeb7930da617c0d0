"""Per-set validation overhead: today's per-set evaluation (baseline) vs one attributed pass.

    .venv/bin/python bench/validation_overhead.py --sets 16 --out /tmp/valbench
    .venv/bin/python bench/validation_overhead.py --arithmetic-only

Runs one tiny real Bridge training on CPU (recipes/smoke.yaml: the 1B recipe at toy size, 2
processes, gloo; a tiny random Llama-3.2 expanded to the speech vocabulary, as tests build it) with
N held-out validation sets. At every evaluation both schemes run side by side, each timed on its own:

- baseline: Bridge's blend evaluation + one `evaluate()` per set of `eval_iters x
  eval_global_batch_size` samples (speechlm.train.validation with each_set=True), lines tagged `@each`;
- new: Bridge's blend evaluation + one `evaluate()` over the per-set blend, each sample's loss
  attributed to its set (speechlm.train.validation's default), untagged lines.

It prints validation seconds / training seconds for each, and the arithmetic for 50 sets at the
1B recipe's sizes (an eval forward is ~1/3 of a training step's compute per sequence). With
--checks two more attributed passes run (not timed into either scheme): `@same` on exactly the
baseline's samples (to compare losses) and `@4x` on four times as many (standard errors shrink).
Results go to OUT/result.json (tests/test_validation.py reads it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EVAL_FORWARD_COST = 1 / 3  # of a training step's compute per sequence (forward 1, backward 2)


# --- arithmetic ------------------------------------------------------------------------------------


def overhead(n_sets: int, eval_interval: int, eval_iters: int, gbs: int, eval_gbs: int | None = None,
             per_set_samples: int | None = None) -> dict:
    """Validation compute / training compute per eval interval, both schemes."""
    eval_gbs = eval_gbs or gbs
    blend = eval_iters * eval_gbs  # Bridge's own evaluation
    train = 3 * gbs * eval_interval  # in eval-forward units
    each = blend + n_sets * blend
    per_set = per_set_samples or max(2, blend // max(1, n_sets))
    new = blend + math.ceil(per_set * n_sets / eval_gbs) * eval_gbs  # whole evaluation batches
    return {"sets": n_sets, "eval_interval": eval_interval, "eval_iters": eval_iters, "gbs": gbs,
            "bridge_eval_sequences": blend, "baseline_sequences": each, "new_sequences": new,
            "new_per_set": per_set, "train_sequences": gbs * eval_interval,
            "baseline_ratio": each / train, "new_ratio": new / train}


def recipe_overhead(recipe: str = "pretrain_llama32_1b.yaml", n_sets: int = 50) -> dict:
    from speechlm.train.recipe import load_recipe
    from omegaconf import OmegaConf

    r = OmegaConf.to_container(load_recipe(REPO / "recipes" / recipe), resolve=False)
    v, t = r["validation"], r["train"]
    gbs = t["global_batch_size"]
    return overhead(n_sets, v["eval_interval"], v["eval_iters"], gbs, v.get("eval_global_batch_size") or gbs)


def print_arithmetic(n_sets: int = 50) -> dict:
    from speechlm.train.recipe import load_recipe
    from omegaconf import OmegaConf

    r = OmegaConf.to_container(load_recipe(REPO / "recipes" / "pretrain_llama32_1b.yaml"), resolve=False)
    old = overhead(n_sets, 1000, 4, 256)  # the recipe before issue 19: eval_interval 1000, eval_iters 4
    new = recipe_overhead(n_sets=n_sets)
    print(f"arithmetic, {n_sets} sets, 1B recipe (global batch {new['gbs']} x seq {r['dataset']['seq_length']}; "
          f"an eval forward = 1/3 of a training step per sequence):")
    print(f"  before (eval_interval 1000, eval_iters 4, each set on its own): (1 + {n_sets}) x 4 x 256 = "
          f"{old['baseline_sequences']:,} sequences per 1000 steps x 256 = {old['train_sequences']:,} trained "
          f"-> {old['baseline_sequences']:,} / (3 x {old['train_sequences']:,}) = {100 * old['baseline_ratio']:.2f} %")
    print(f"  now (eval_interval {new['eval_interval']}, eval_iters {new['eval_iters']}, one attributed pass): "
          f"{new['bridge_eval_sequences']:,} (Bridge's blend) + {n_sets} x {new['new_per_set']} (per set) = "
          f"{new['new_sequences']:,} sequences per {new['eval_interval']} steps x {new['gbs']} = "
          f"{new['train_sequences']:,} trained -> {100 * new['new_ratio']:.2f} % "
          f"(each set on its own at these sizes: {100 * new['baseline_ratio']:.2f} %)")
    return new


# --- data ------------------------------------------------------------------------------------------


def make_data(out: Path, n_sets: int, docs: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """A tiny expanded model and a blend with n_sets held-out sets (audio, each its own code offset)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from speechlm.data.blend_file import Blend
    from speechlm.demo import tiny
    from speechlm.model.vocab_expansion import expand_vocab
    from speechlm.token_layout import TokenLayout

    model = out / "model"
    if not (model / "config.json").is_file():
        base = tiny.make_tiny_llama(out / "tiny-base")
        expand_vocab(base, model)
    layout = TokenLayout.load(model)
    rng = np.random.default_rng(seed)
    words = [rng.integers(0, 60_000, size=int(rng.integers(3, 6))) for _ in range(30)]

    def document(offset: int):
        picks = rng.integers(0, len(words), size=int(rng.integers(3, 7)))
        return layout.audio_document(np.concatenate([words[i] for i in picks]) + offset)

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train, valid, rows = [], {}, []
    for s in range(n_sets):
        name = f"audio/s{s:02d}"
        for split, count in (("train", 200), ("valid", docs)):
            prefix = str(data / f"set{s:02d}_{split}")
            builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
            tokens = 0
            for _ in range(count):
                doc = document(s * 97)
                tokens += len(doc)
                builder.add_document(doc, [len(doc)])
            builder.finalize(prefix + ".idx")
            if split == "train":
                train.append(prefix)
                rows.append({"name": name, "kind": "audio", "language": f"s{s:02d}", "prefix": prefix, "tokens": tokens})
            else:
                valid[name] = prefix
    blend = Blend(layout_hash=layout.layout_hash, train_prefixes=train, train_weights=[1.0 / n_sets] * n_sets,
                  validation=valid, planned_tokens=0, datasets=rows)
    return model, blend.write(data / "blend.yaml")


# --- the run (a torchrun worker) ----------------------------------------------------------------------


def worker(args) -> None:
    from speechlm.train import megatron_env  # noqa: F401  (CPU mode first)
    from speechlm.train.recipe import load_recipe
    from speechlm.train.run import build_config

    recipe = load_recipe(REPO / "recipes" / "smoke.yaml", [
        f"speechlm.hf_model={args.model}", f"speechlm.blend={args.blend}", "speechlm.from_scratch=true",
        f"checkpoint.save={args.out / 'ckpt'}", f"train.train_iters={args.iters}",
        f"validation.eval_interval={args.eval_interval}", f"validation.eval_iters={args.eval_iters}",
        "checkpoint.save_interval=100000", *args.override])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, plan, blend = build_config(recipe, world)
    megatron_env.init_single_process_env()

    from megatron.bridge.training.callbacks import Callback
    from megatron.bridge.training.pretrain import pretrain

    from speechlm.train.forward_step import forward_step
    from speechlm.train.validation import PerSetValidation

    n_old = cfg.validation.eval_iters * (cfg.validation.eval_global_batch_size or cfg.train.global_batch_size)
    schemes = {"each": PerSetValidation(blend.validation, forward_step, each_set=True, tag="@each"),
               "new": PerSetValidation(blend.validation, forward_step, per_set_samples=args.per_set_samples)}
    if args.checks:
        schemes["same"] = PerSetValidation(blend.validation, forward_step, each_set=False, per_set_samples=n_old,
                                           tag="@same")
        schemes["4x"] = PerSetValidation(blend.validation, forward_step, each_set=False, per_set_samples=4 * n_old,
                                         tag="@4x")
    seconds = {"train": 0.0, "bridge_eval": 0.0, **{k: 0.0 for k in schemes}}
    results: dict[str, dict] = {k: {} for k in schemes}

    class Timing(Callback):
        """Training step time; Bridge's own evaluation (on_eval_start -> its on_eval_end)."""

        def on_train_step_start(self, context):
            self.t = time.perf_counter()

        def on_train_step_end(self, context):
            if context.state.train_state.step > 1:  # the first step is start-up (allocation, graph)
                seconds["train"] += time.perf_counter() - self.t

        def on_eval_start(self, context):
            self.e = time.perf_counter()

        def on_eval_end(self, context):
            seconds["bridge_eval"] += time.perf_counter() - self.e
            step = context.state.train_state.step
            for key, cb in schemes.items():
                t = time.perf_counter()
                cb.on_eval_end(context)
                seconds[key] += time.perf_counter() - t
                results[key][step] = cb.last

        def on_train_end(self, context):
            schemes["new"].on_train_end(context)

    pretrain(cfg, forward_step, callbacks=[Timing()])
    if os.environ.get("RANK", "0") == "0":  # (pretrain() has destroyed the process group)
        n_sets = len(blend.validation)
        evals = len(results["new"])
        out = {"sets": n_sets, "world_size": world, "iters": cfg.train.train_iters,
               "eval_interval": cfg.validation.eval_interval, "eval_iters": cfg.validation.eval_iters,
               "global_batch_size": cfg.train.global_batch_size, "evaluations": evals,
               "eval_global_batch_size": cfg.validation.eval_global_batch_size,
               "trained_steps_timed": cfg.train.train_iters - 1,
               "per_set_samples": {k: (cb.blend_size(cfg)[0] if not cb.each_set else n_old) for k, cb in schemes.items()},
               "seconds": seconds, "results": results}
        # Training time per step is the same for both; the first step (start-up) is replaced by the mean.
        train = seconds["train"] * cfg.train.train_iters / max(1, cfg.train.train_iters - 1)
        out["ratio"] = {k: (seconds["bridge_eval"] + seconds[k]) / train for k in ("each", "new")}
        (args.out / "result.json").write_text(json.dumps(out, indent=1))


# --- the command ---------------------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="bench/validation_overhead.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Prints validation seconds / training seconds for both schemes and the 50-set "
                                       "arithmetic at the 1B recipe's sizes.")
    p.add_argument("--out", type=Path, default=Path("/tmp/validation_overhead"), help="work directory (default %(default)s)")
    p.add_argument("--sets", type=int, default=16, help="held-out validation sets to generate (default %(default)s)")
    p.add_argument("--model", type=Path, help="an expanded tiny model (instead of building one)")
    p.add_argument("--blend", type=Path, help="a blend file (instead of generating --sets sets)")
    p.add_argument("--iters", type=int, default=40, help="training iterations (default %(default)s)")
    p.add_argument("--eval-interval", type=int, default=20, help="validation.eval_interval (default %(default)s)")
    p.add_argument("--eval-iters", type=int, default=2, help="validation.eval_iters (default %(default)s)")
    p.add_argument("--per-set-samples", type=int, default=None,
                   help="samples per set of the attributed pass (default: Bridge's evaluation size split over the sets)")
    p.add_argument("--nproc", type=int, default=2, help="processes (default %(default)s)")
    p.add_argument("--checks", action="store_true", help="also the @same and @4x attributed passes (tests)")
    p.add_argument("--arithmetic-only", action="store_true", help="print the 50-set arithmetic and exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("override", nargs="*", help="extra recipe overrides key=value")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.arithmetic_only:
        print_arithmetic()
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in ("ckpt", "tensorboard", "result.json"):  # a fresh run, not a resume of the last one
        shutil.rmtree(args.out / stale, ignore_errors=True) if stale != "result.json" else (args.out / stale).unlink(missing_ok=True)
    if args.model is None or args.blend is None:
        args.model, args.blend = make_data(args.out, args.sets)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           str(Path(__file__).resolve()), "--worker", "--out", str(args.out), "--model", str(args.model),
           "--blend", str(args.blend), "--iters", str(args.iters), "--eval-interval", str(args.eval_interval),
           "--eval-iters", str(args.eval_iters), *(["--checks"] if args.checks else []),
           *(["--per-set-samples", str(args.per_set_samples)] if args.per_set_samples else []), *args.override]
    with open(args.out / "log.txt", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"the run failed (rc {proc.returncode}): see {args.out / 'log.txt'}")
    r = json.loads((args.out / "result.json").read_text())
    s = r["seconds"]
    print(f"CPU run: {r['sets']} sets, {r['world_size']} processes, {r['iters']} steps of {r['global_batch_size']} "
          f"sequences, {r['evaluations']} evaluations of {r['eval_iters']} x {r['eval_global_batch_size']} sequences; "
          f"training {s['train']:.1f} s over {r['trained_steps_timed']} steps")
    for key, label in (("each", "baseline (each set on its own)"), ("new", "new (one attributed pass)")):
        print(f"  {label:34s} per set {r['per_set_samples'][key]:5d} samples: validation {s['bridge_eval'] + s[key]:7.1f} s "
              f"(Bridge's blend {s['bridge_eval']:.1f} s + per-set {s[key]:.1f} s) / training -> {100 * r['ratio'][key]:.1f} %")
    print_arithmetic()


if __name__ == "__main__":
    main()
