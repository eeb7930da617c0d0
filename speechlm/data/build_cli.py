"""The command-line options and steps both builders' CLIs share (`data_prep/build_speech.py`,
`data_prep/build_text.py`). Light on purpose: `--help` imports nothing else of the package."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable


def env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def add_model_options(ap: argparse.ArgumentParser, *, input_help: str, output_help: str) -> None:
    """--input, --model, --output."""
    ap.add_argument("--input", nargs="+", help=input_help)
    ap.add_argument("--model", help="expanded model dir (token_layout.json + tokenizer.json)")
    ap.add_argument("--output", required=True, help=output_help)


def add_split_options(ap: argparse.ArgumentParser, *, valid_help: str) -> None:
    """--seq-length, --valid-fraction."""
    ap.add_argument("--seq-length", type=int, default=2048, help="training sequence length; documents never exceed it (default 2048)")
    ap.add_argument("--valid-fraction", type=float, default=0.01, help=valid_help)


def add_task_options(ap: argparse.ArgumentParser, *, unit: str, merge_help: str) -> None:
    """The parallelism and S3 / R2 groups and --quiet; `unit` names one input ("shard", "file")."""
    g = ap.add_argument_group("parallelism")
    g.add_argument("--num-tasks", type=int, default=env_int("SLURM_ARRAY_TASK_COUNT", 1),
                   help=f"tasks sharing the {unit}s (default SLURM_ARRAY_TASK_COUNT or 1)")
    g.add_argument("--task-index", type=int, default=None,
                   help="this task, 0-based (default SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, or 0)")
    g.add_argument("--merge", action="store_true", help=merge_help)
    g.add_argument("--no-merge", action="store_true", help="do not merge even when this is the only task")
    g = ap.add_argument_group("S3 / R2")
    g.add_argument("--profile", help="AWS profile (default AWS_PROFILE)")
    g.add_argument("--endpoint-url", help="S3 endpoint (default R2_ENDPOINT_URL or AWS_ENDPOINT_URL)")
    g.add_argument("--max-attempts", type=int, default=10,
                   help=f"attempts per S3 request and resumes per {unit} (default 10)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")


def setup_logging(quiet: bool) -> None:
    # megatron-core logs every partial it reads at INFO: keep the root at WARNING, ours at INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("speechlm").setLevel(logging.WARNING if quiet else logging.INFO)


def task_index(args: argparse.Namespace) -> int:
    """--task-index, else this SLURM array element's 0-based index, else 0."""
    if args.task_index is not None:
        return args.task_index
    return env_int("SLURM_ARRAY_TASK_ID", 0) - env_int("SLURM_ARRAY_TASK_MIN", 0)


def s3_settings(args: argparse.Namespace) -> Any:
    """The S3 settings of --profile, --endpoint-url, --max-attempts and the environment."""
    from speechlm.data import s3

    return s3.S3Settings.from_env(profile=args.profile, endpoint_url=args.endpoint_url, max_attempts=args.max_attempts)


def build_kwargs(args: argparse.Namespace, task_index: int) -> dict[str, Any]:
    """The keyword arguments of `speech.build` / `text.build` that the shared options give."""
    return dict(
        merge_after=args.num_tasks == 1 and not args.no_merge,
        seq_length=args.seq_length, valid_fraction=args.valid_fraction, num_tasks=args.num_tasks,
        task_index=task_index, s3_settings=s3_settings(args), progress=not args.quiet,
    )


def run(
    args: argparse.Namespace,
    ap: argparse.ArgumentParser,
    *,
    required: tuple[str, ...],
    build: Callable[[int], dict[str, Any]],
    merge: Callable[..., dict[str, Any]],
    format_manifest: Callable[[dict[str, Any]], str],
    unit: str,
    merge_command: str,
) -> int:
    """What a builder CLI does once its options are parsed: --merge only merges; else the
    `required` options are checked and `build(task_index)` runs (and merges when it is the only
    task). Returns the exit status: 2 for a build that cannot start or finish (one line), 1 when
    some inputs failed (listed), else 0 after the manifest or, unmerged, the task's progress and
    `merge_command`."""
    from speechlm.data.partials import SpeechDataError

    try:
        if args.merge:
            print(format_manifest(merge(args.output, progress=not args.quiet)))
            return 0
        missing = [f"--{n}" for n in required if getattr(args, n) is None]
        if missing:
            ap.error(f"missing {', '.join(missing)}")
        index = task_index(args)
        summary = build(index)
    except SpeechDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = summary["failed"]
    if failed:
        for url, why in failed:
            print(f"FAILED {url}: {why}", file=sys.stderr)
        print(f"{len(failed)} {unit}s failed (not marked done): rerun this task to retry them", file=sys.stderr)
        return 1
    if "manifest" in summary:
        print(format_manifest(summary["manifest"]))
    else:
        print(f"task {index}/{args.num_tasks}: {summary[f'task_{unit}s']} of {summary[f'{unit}s']} {unit}s done; "
              f"merge with: {merge_command} --output {args.output}")
    return 0
