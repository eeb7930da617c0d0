#!/usr/bin/env bash
# Text datasets from jsonl/parquet corpora (data_prep/build_text.py) as a SLURM array: each
# element builds its round-robin share of the input files; element 0 submits the merge
# (build_text.py --merge) as a job that depends on the whole array (afterok). Without
# --array one job builds and merges. Reruns skip finished files.
#
#   INPUT='s3://corpora/sangraha/hi/*.parquet' MODEL=/models/llama32-1b-speech \
#   OUTPUT=/data/text/sangraha PREP_ARGS='--source sangraha --language hi' sbatch --array=0-15 slurm/prep_text.sh [--dry-run]
#
# Variables (docs/slurm.md): OUTPUT (required), INPUT, MODEL, PREP_ARGS (more build_text.py
# flags; the script's own arguments are appended too), MERGE=no, MERGE_SBATCH_ARGS, PREP_MODE,
# PYTHON, CONTAINER_IMAGE, CONTAINER_MOUNTS, CONTAINER_WORKDIR, SRUN_ARGS, DRY_RUN, REPO.
#SBATCH --job-name=speechlm-prep-text
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# sbatch runs a spooled copy of this file: find the checkout through REPO or the submit dir.
repo=${REPO:-${SLURM_SUBMIT_DIR:-}}
[[ -n $repo && -f $repo/slurm/common.sh ]] || repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=slurm/common.sh
source "$repo/slurm/common.sh"
REPO=${REPO:-$repo}

PREP_SCRIPT=prep_text.sh
prep_main data_prep/build_text.py --merge "$@"
