"""Training entry point: a recipe YAML (+ key=value overrides) -> Bridge ConfigContainer -> pretrain().

    torchrun --nproc-per-node 8 -m speechlm.train --config recipes/pretrain_llama32_1b.yaml [key=value ...]
    python -m speechlm.train --config recipes/pretrain_llama32_1b.yaml --dry-run --world-size 64 [key=value ...]

A recipe has two kinds of top-level keys: Bridge's own ConfigContainer sections (`train`,
`optimizer`, `scheduler`, `dataset`, `checkpoint`, `logger`, `model`, `ddp`, ...), merged onto
Bridge's `_pretrain_common()` defaults exactly as Bridge's own YAML overrides are, and one
`speechlm` section for what Bridge has no field for (model directory, blend file, run length in
tokens, warm-up as a fraction, checkpoint schedule and retention). A recipe may name a `base`
recipe and state only what differs from it; a key that no section has is refused, naming the
closest one. `speechlm.mode: sft` makes the run a text-to-speech fine-tuning (speechlm.train.sft,
docs/sft.md): packed TTS pairs, loss on speech only, Bridge's finetune().
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from speechlm.train import megatron_env

import torch  # noqa: E402  (after the CPU mode)
import yaml  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from speechlm.data import blend_file
from speechlm.train import checkpoints  # noqa: E402
from speechlm.train.recipe import OUR_KEYS, RecipeError, load_recipe  # noqa: E402,F401  (re-exported)
from speechlm.token_layout import VOCAB_SIZE, LayoutMismatchError, TokenLayout  # noqa: E402

OUR_SECTION = "speechlm"
REPO = Path(__file__).resolve().parents[2]
# The run's tokens against the blend's planned_tokens (what its weights, epochs and caps assume):
# a warning past 5 %, a refusal past 2x either way.
PLAN_WARN, PLAN_REFUSE = 0.05, 2.0


@dataclass
class Plan:
    """What the resolved recipe means for the run (printed by --dry-run, checked before any GPU work)."""

    world_size: int
    tp: int
    pp: int
    dp: int
    seq_length: int
    global_batch_size: int
    train_iters: int
    warmup_iters: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    @property
    def train_tokens(self) -> int:
        return self.tokens_per_step * self.train_iters


def build_config(recipe: DictConfig, world_size: int, *, gpu: bool | None = None):
    """A Bridge ConfigContainer (Bridge's pretraining defaults, then the recipe), plus its Plan.

    `gpu` builds the configuration of the GPU path (TE layer spec, fused kernels, NCCL) or of the
    CPU path whatever this machine is (default: this machine's); no model is built here."""
    from megatron.bridge import AutoBridge
    from megatron.bridge.recipes.common import _pretrain_common
    from megatron.bridge.training.utils.omegaconf_utils import apply_overrides, create_omegaconf_dict_config
    from megatron.bridge.utils.instantiate_utils import register_allowed_target_prefix

    ours = OmegaConf.to_container(recipe.get(OUR_SECTION) or {}, resolve=True)
    hf_model = ours.get("hf_model")
    if not hf_model or not (Path(hf_model) / "config.json").is_file():
        raise RecipeError(f"{OUR_SECTION}.hf_model must name a model directory with config.json and the "
                          f"tokenizer (the vocabulary-expanded or converted model); got {hf_model!r}")

    cfg = _pretrain_common()
    # The architecture comes from the HF config; weights from checkpoint.pretrained_checkpoint
    # (a converted model) or checkpoint.load (resume).
    cfg.model = AutoBridge.from_hf_pretrained(hf_model).to_megatron_provider(load_weights=False)
    megatron_env.adapt_provider(cfg.model, gpu)
    cfg.tokenizer.tokenizer_model = str(hf_model)
    # Keep the model's vocabulary (193,792 after expansion): Bridge would re-derive it from the tokenizer.
    cfg.tokenizer.use_tokenizer_vocab_size = False
    cfg.dist.distributed_backend = megatron_env.distributed_backend(gpu)
    cfg.checkpoint.custom_manager_class = "speechlm.train.checkpoint_manager.SpeechLMCheckpointManager"
    register_allowed_target_prefix("speechlm.")  # Bridge instantiates only allow-listed classes

    bridge_sections = OmegaConf.masked_copy(recipe, [k for k in recipe if k != OUR_SECTION])
    unknown = unknown_keys(cfg, OmegaConf.to_container(recipe))
    if unknown:
        raise RecipeError("the recipe has keys that no section has:\n  - " + "\n  - ".join(unknown))
    merged, excluded = create_omegaconf_dict_config(cfg)
    try:
        merged = OmegaConf.merge(merged, bridge_sections)
        apply_overrides(cfg, OmegaConf.to_container(merged, resolve=True, throw_on_missing=True), excluded)
    except Exception as e:  # wrong type, unset ??? value
        raise RecipeError(f"recipe does not fit Bridge's ConfigContainer: {e}") from e
    _schedule_weight_decay(cfg, recipe)

    cfg.model.seq_length = cfg.dataset.seq_length  # Bridge keeps it twice; the recipe states it once
    if cfg.mixed_precision is None:  # fp32 (CPU runs)
        cfg.model.params_dtype = torch.float32
        cfg.model.bf16 = cfg.model.fp16 = False
        cfg.optimizer.bf16 = cfg.optimizer.fp16 = False

    from speechlm.train import sft  # (also its rank-0 warning printer)

    sft_mode = _mode(ours) == "sft"
    if sft_mode:  # SFT (speechlm.train.sft): the TTS pairs of the blend, packed, loss on speech only
        blend = sft.select_data(cfg, ours, hf_model)
    else:
        blend = _apply_blend(cfg, ours, hf_model)
    plan = _plan(cfg, ours, world_size)
    warnings = _check(cfg, plan, hf_model, blend, ours)
    if sft_mode:
        problems, notes = sft.finish_config(cfg, ours, hf_model, blend)
        if problems:
            raise RecipeError("the SFT recipe cannot work:\n  - " + "\n  - ".join(problems))
        warnings += notes
    sft.warn(warnings)
    _set_policy(cfg, ours, recipe, hf_model, blend)
    return cfg, plan, blend


def unknown_keys(cfg, recipe: dict) -> list[str]:
    """Recipe keys that name no field: Bridge's own merge accepts any key (its OmegaConf copy of the
    ConfigContainer is not structured) and `apply_overrides` skips unknown ones with a log line,
    so a misspelled key would be shown by --dry-run and then ignored. Each with its closest key."""
    problems = _unknown(cfg, {k: v for k, v in recipe.items() if k != OUR_SECTION}, "", extra=(OUR_SECTION,))
    ours = recipe.get(OUR_SECTION) or {}
    for key in ours:
        if key not in OUR_KEYS:
            problems.append(_unknown_key(key, OUR_KEYS, f"{OUR_SECTION}."))
    return problems


def _unknown_key(key: str, known, prefix: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"unknown key {prefix}{key}" + (f" (did you mean {prefix}{close[0]}?)" if close else "")


def _unknown(obj, given: dict, prefix: str, extra: tuple = ()) -> list[str]:
    fields = [f.name for f in dataclasses.fields(obj)]
    problems = []
    for key, value in given.items():
        if key not in fields and key not in extra:
            problems.append(_unknown_key(key, [*fields, *extra], prefix))
            continue
        current = getattr(obj, key, None)
        # Into nested sections (dataclasses); a dict field (env_vars, ...) or a `_target_` object takes any key.
        if isinstance(value, dict) and "_target_" not in value and dataclasses.is_dataclass(current):
            problems += _unknown(current, value, f"{prefix}{key}.")
    return problems


def _schedule_weight_decay(cfg, recipe: DictConfig) -> None:
    """The recipe's optimizer.weight_decay as the scheduled decay. megatron-core's
    OptimizerParamScheduler writes start/end_weight_decay into every parameter group at each step
    (times the group's wd_mult: 0 for biases and norms), so the optimizer's own weight_decay is never
    used; Bridge's defaults schedule a constant 0.033. Megatron-LM's arguments set start = end =
    weight_decay for the constant style; so do we, unless the recipe states the schedule itself."""
    s = cfg.scheduler
    for key in ("start_weight_decay", "end_weight_decay"):
        if OmegaConf.select(recipe, f"scheduler.{key}") is None:
            setattr(s, key, cfg.optimizer.weight_decay)
    if s.end_weight_decay < s.start_weight_decay or (s.weight_decay_incr_style == "constant"
                                                     and s.start_weight_decay != s.end_weight_decay):
        raise RecipeError(f"scheduler.start_weight_decay={s.start_weight_decay} / end_weight_decay={s.end_weight_decay}: "
                          f"the end must be >= the start, and equal to it with weight_decay_incr_style=constant "
                          f"(use linear or cosine to ramp)")


def _mode(ours: dict) -> str:
    mode = ours.get("mode") or "pretrain"
    if mode not in ("pretrain", "sft"):
        raise RecipeError(f"{OUR_SECTION}.mode must be pretrain or sft, got {mode!r}")
    return mode


def _apply_blend(cfg, ours: dict, hf_model: str):
    if not ours.get("blend"):
        return None  # the recipe states dataset.blend itself (tests, tools)
    blend = blend_file.load(ours["blend"])
    layout = TokenLayout.load(hf_model)
    layout.check_compatible(blend.layout_hash, f"blend {blend.path} vs model {hf_model}")
    valid = list(blend.validation.values())
    cfg.dataset.blend = None
    cfg.dataset.split = None
    cfg.dataset.blend_per_split = [(blend.train_prefixes, blend.train_weights), (valid, None) if valid else None, None]
    return blend


def _plan(cfg, ours: dict, world_size: int) -> Plan:
    tp, pp = cfg.model.tensor_model_parallel_size, cfg.model.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise RecipeError(f"{world_size} ranks cannot be split into TP={tp} x PP={pp}: use a world size divisible by {tp * pp}")
    gbs, seq = cfg.train.global_batch_size, cfg.dataset.seq_length
    if ours.get("train_tokens"):  # run length in tokens wins over train.train_iters
        cfg.train.train_iters = math.ceil(int(ours["train_tokens"]) / (gbs * seq))
    iters = cfg.train.train_iters
    if ours.get("warmup_fraction") is not None:
        cfg.scheduler.lr_warmup_iters = max(1, round(float(ours["warmup_fraction"]) * iters))
    cfg.scheduler.lr_decay_iters = iters
    return Plan(world_size, tp, pp, world_size // (tp * pp), seq, gbs, iters, cfg.scheduler.lr_warmup_iters)


def _check(cfg, plan: Plan, hf_model: str, blend, ours: dict) -> list[str]:
    """Fail before any GPU work, saying what to change; returns warnings."""
    m = cfg.model
    problems, warnings = [], []
    if plan.global_batch_size % (cfg.train.micro_batch_size * plan.dp):
        problems.append(f"train.global_batch_size={plan.global_batch_size} is not divisible by micro_batch_size "
                        f"({cfg.train.micro_batch_size}) x data-parallel size ({plan.dp})")
    if m.num_attention_heads % plan.tp or (m.num_query_groups or m.num_attention_heads) % plan.tp:
        problems.append(f"model.tensor_model_parallel_size={plan.tp} must divide the attention heads "
                        f"({m.num_attention_heads}) and KV heads ({m.num_query_groups})")
    if cfg.scheduler.lr_warmup_iters >= plan.train_iters:
        problems.append(f"warm-up ({cfg.scheduler.lr_warmup_iters} iterations) must be shorter than the run ({plan.train_iters})")
    if not cfg.checkpoint.save:
        problems.append("checkpoint.save must name the run's checkpoint directory")
    problems += _check_start(cfg, ours)
    if cfg.logger.wandb_project and importlib.util.find_spec("wandb") is None:
        problems.append(f"logger.wandb_project={cfg.logger.wandb_project!r} needs wandb, which is not installed "
                        f"(the NeMo container has it; elsewhere: pip install wandb)")
    problem, warning = compare_plan(blend, plan) if _mode(ours) == "pretrain" else (None, None)
    problems += [problem] if problem else []
    warnings += [warning] if warning else []
    layout_file = Path(hf_model) / "token_layout.json"
    if layout_file.is_file():
        layout = TokenLayout.load(hf_model)  # verifies its own hash
        if m.vocab_size < VOCAB_SIZE:
            problems.append(f"{hf_model} has a vocabulary of {m.vocab_size} < {VOCAB_SIZE}: expand it first")
        start = cfg.checkpoint.pretrained_checkpoint  # a converted model records its layout too
        if start and (Path(start) / "token_layout.json").is_file():
            try:
                layout.check_compatible(TokenLayout.load(start), f"pretrained checkpoint {start} vs model {hf_model}")
            except LayoutMismatchError as e:
                problems.append(str(e))
    elif blend is not None:
        problems.append(f"{hf_model} has no token_layout.json: use the vocabulary-expanded model")
    if cfg.dataset.blend is None and cfg.dataset.blend_per_split is None:
        problems.append(f"no data: set {OUR_SECTION}.blend (a blend file from data_prep/plan_mix.py) or dataset.blend")
    if problems:
        raise RecipeError("the recipe cannot work:\n  - " + "\n  - ".join(problems))
    return warnings


def _check_start(cfg, ours: dict) -> list[str]:
    """A pretraining run starts from the converted model (or resumes); random weights only when asked."""
    from megatron.bridge.training.utils.checkpoint_utils import checkpoint_exists, is_hf_checkpoint_dir

    start, load = cfg.checkpoint.pretrained_checkpoint, cfg.checkpoint.load
    from_scratch = ours.get("from_scratch")
    if from_scratch not in (None, True, False):
        return [f"{OUR_SECTION}.from_scratch must be true or false, got {from_scratch!r}"]
    if from_scratch and start:
        return [f"{OUR_SECTION}.from_scratch=true but checkpoint.pretrained_checkpoint={start} is set: unset one of them"]
    resumes = bool(load) and (checkpoint_exists(load) or is_hf_checkpoint_dir(load))  # Bridge's test
    if _mode(ours) == "pretrain" and not (start or resumes or from_scratch):
        # (SFT refuses a missing checkpoint itself, speechlm.train.sft.)
        return [f"nothing to start from: set checkpoint.pretrained_checkpoint (the converted model, "
                f"conversion/hf_to_megatron.py); no checkpoint to resume in checkpoint.load={load}. "
                f"To train from random weights, set {OUR_SECTION}.from_scratch=true"]
    return []


def compare_plan(blend, plan: Plan) -> tuple[str | None, str | None]:
    """(problem, warning): the run's tokens against the blend's planned_tokens. A blend without a plan
    (planned_tokens 0: written by hand, not by plan_mix.py) is not compared."""
    if blend is None or not blend.planned_tokens:
        return None, None
    ratio = plan.train_tokens / blend.planned_tokens
    text = (f"the run trains {plan.train_tokens:,} tokens but its blend {blend.path} has planned_tokens="
            f"{blend.planned_tokens:,} ({ratio:.2f}x)")
    if ratio > PLAN_REFUSE or ratio < 1 / PLAN_REFUSE:
        return (f"{text}: every dataset's epochs and caps would be off by that factor; re-plan the blend "
                f"(data_prep/plan_mix.py, planned_tokens: {plan.train_tokens}) or change the run length"), None
    if abs(ratio - 1) > PLAN_WARN:
        return None, f"{text}: the datasets' epochs differ from the plan's by that factor"
    return None, None


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _set_policy(cfg, ours: dict, recipe: DictConfig, hf_model: str, blend) -> None:
    packages = {}
    for pkg in ("torch", "megatron-core", "megatron-bridge", "transformers", "speechlm"):
        try:
            packages[pkg] = version(pkg)
        except PackageNotFoundError:
            packages[pkg] = None
    layout_file = Path(hf_model) / "token_layout.json"
    checkpoints.POLICY.update(
        schedule=ours.get("checkpoint_schedule") or [],
        keep_last=ours.get("keep_last"),
        pinned=list(ours.get("pinned") or []),
        provenance={
            "git_commit": _git_commit(),
            "packages": packages,
            "recipe": OmegaConf.to_container(recipe, resolve=True),
            "layout_hash": TokenLayout.load(hf_model).layout_hash if layout_file.is_file() else None,
            "blend": {"path": str(blend.path), "sha256": blend.sha256} if blend else None,
            "manifests": blend.manifests if blend else {},
        },
    )
    if checkpoints.POLICY["schedule"]:
        cfg.checkpoint.save_interval = checkpoints.save_interval_at(0, checkpoints.POLICY["schedule"])


# --- dry run -------------------------------------------------------------------------------------


def estimate_memory_gib(cfg, plan: Plan) -> dict[str, float]:
    """Rough GPU memory per rank: weights, grads, optimizer, activations, logits (bf16 training,
    fp32 grads and Adam with the distributed optimizer; flash attention, no recompute)."""
    m = cfg.model
    h, layers, vocab, ffn = m.hidden_size, m.num_layers, m.vocab_size, m.ffn_hidden_size
    kv = (m.num_query_groups or m.num_attention_heads) * m.kv_channels
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * ffn + 2 * h
    params = layers * per_layer + vocab * h * (1 if m.share_embeddings_and_output_weights else 2) + h
    shard = params / (plan.tp * plan.pp)
    dist_opt = cfg.ddp.use_distributed_optimizer
    b, s = cfg.train.micro_batch_size, plan.seq_length
    gib = 2**30
    est = {
        "parameters (B)": params / 1e9,
        "weights bf16": 2 * shard / gib,
        "grads fp32": 4 * shard / gib,
        "optimizer fp32 (master + Adam)": 12 * shard / (plan.dp if dist_opt else 1) / gib,
        # ~34 bytes per token per hidden unit per layer (Korthikanti et al. 2022), sharded by TP
        "activations": 34 * s * b * h * layers / plan.tp / plan.pp / gib,
        # logits in bf16 plus fp32 for the cross-entropy
        "logits": 6 * s * b * vocab / plan.tp / gib,
    }
    est["total"] = sum(v for k, v in est.items() if k != "parameters (B)")
    return est


def print_dry_run(recipe: DictConfig, cfg, plan: Plan, blend) -> None:
    print("# resolved recipe\n" + OmegaConf.to_yaml(recipe, resolve=True))
    print(f"ranks {plan.world_size} = TP {plan.tp} x PP {plan.pp} x DP {plan.dp}")
    print(f"steps {plan.train_iters:,} (warm-up {plan.warmup_iters:,}); tokens per step {plan.tokens_per_step:,}; "
          f"run tokens {plan.train_tokens:,}")
    print(f"LR peak {cfg.optimizer.lr:g} -> min {cfg.optimizer.min_lr:g} ({cfg.scheduler.lr_decay_style}); "
          f"checkpoints: schedule {checkpoints.POLICY['schedule'] or cfg.checkpoint.save_interval}, keep last {checkpoints.POLICY['keep_last']}")
    if _mode(OmegaConf.to_container(recipe.get(OUR_SECTION) or {})) == "sft":
        from speechlm.train import sft

        print(sft.describe(cfg))
    elif blend is not None:
        if blend.planned_tokens:
            ratio = plan.train_tokens / blend.planned_tokens
            print(f"blend planned for {blend.planned_tokens:,} tokens; this run trains {ratio:.2f}x that")
        else:
            print("the blend records no planned tokens (planned_tokens: 0): the run's length is not compared with a plan")
        print("planned epochs of each dataset over this run:")
        weights = dict(zip(blend.train_prefixes, blend.train_weights))
        for row in blend.datasets:
            tokens = max(1, int(row.get("tokens", 0)))
            epochs = weights.get(row.get("prefix"), 0.0) * plan.train_tokens / tokens
            print(f"  {row.get('name', row.get('prefix')):28s} weight {weights.get(row.get('prefix'), 0):.4f}  epochs {epochs:.2f}")
    print("estimated GPU memory per rank (GiB):")
    for k, v in estimate_memory_gib(cfg, plan).items():
        print(f"  {k:32s} {v:8.2f}")
    from speechlm.train.effective_settings import effective_settings

    print("# effective settings: what Megatron will apply, read from its own objects (speechlm.train.effective_settings)")
    print(yaml.safe_dump(effective_settings(cfg, plan), sort_keys=False, default_flow_style=None, width=120), end="")


# --- run -----------------------------------------------------------------------------------------


def _forward_sigusr1() -> None:
    """SLURM sends SIGUSR1 before a time limit or preemption; Bridge's exit handler watches SIGTERM."""
    def handler(signum, frame):
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGUSR1, handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m speechlm.train",
        description="Pretrain with Megatron-Bridge from a recipe YAML. Run under torchrun or srun.",
        epilog="Overrides use the recipe's keys, e.g. train.train_iters=100 optimizer.lr=1e-4 speechlm.blend=blend.yaml",
    )
    parser.add_argument("--config", required=True, help="recipe YAML (recipes/*.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved recipe, step count, tokens per step, dataset epochs, a memory estimate and the "
                             "effective settings (speechlm.train.effective_settings); train nothing")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="number of ranks to plan for (default: $WORLD_SIZE or 1)")
    parser.add_argument("--gpu", action="store_true",
                        help="with --dry-run: plan the GPU path (TransformerEngine layers, fused kernels, NCCL) "
                             "on a machine without a GPU")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied on top of the recipe")
    args = parser.parse_args(argv)
    if args.gpu and not args.dry_run:
        parser.error("--gpu plans a GPU run (with --dry-run); a training run takes this machine's path")

    try:
        recipe = load_recipe(args.config, args.overrides)
        cfg, plan, blend = build_config(recipe, args.world_size, gpu=True if args.gpu else None)
        if args.dry_run:
            print_dry_run(recipe, cfg, plan, blend)
            return
    except (RecipeError, blend_file.BlendError, LayoutMismatchError, FileNotFoundError) as e:
        sys.exit(f"speechlm.train: {e}")

    megatron_env.init_single_process_env()
    _forward_sigusr1()
    from megatron.bridge.training.pretrain import pretrain

    from speechlm.train.metrics import ThroughputMetrics
    from speechlm.train.forward_step import forward_step
    from speechlm.train.validation import PerSetValidation

    peak = float(OmegaConf.select(recipe, f"{OUR_SECTION}.peak_tflops_per_gpu", default=989.0))
    callbacks = [ThroughputMetrics(peak, plan.world_size)]
    if _mode(OmegaConf.to_container(recipe.get(OUR_SECTION) or {})) == "sft":
        # Bridge's finetune() is pretrain() that refuses to start without weights to load; its
        # plain GPT step reads our packed batches (THD metadata or attention mask) as they are.
        from megatron.bridge.training import gpt_step
        from megatron.bridge.training.finetune import finetune

        from speechlm.train import sft

        # Per-set validation reads the sets through our step, which attributes each row's loss to
        # its set: one pass for all sets (speechlm.train.validation).
        finetune(cfg, gpt_step.forward_step, callbacks=callbacks + sft.callbacks(blend, forward_step))
        return
    if blend and blend.validation:
        callbacks.append(PerSetValidation(blend.validation, forward_step))
    pretrain(cfg, forward_step, callbacks=callbacks)


if __name__ == "__main__":
    main(sys.argv[1:])
