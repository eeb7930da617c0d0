#!/usr/bin/env bash
# HF <-> Megatron checkpoint conversion (conversion/hf_to_megatron.py, megatron_to_hf.py) on a
# GPU node. hf-to-megatron runs one task per GPU of the allocation (TP x PP of them, e.g.
# `sbatch --gpus-per-node=2 --ntasks-per-node=2 slurm/convert.sh hf-to-megatron ... --tp 2`);
# megatron-to-hf is one process whatever the training TP was.
#
#   sbatch slurm/convert.sh hf-to-megatron --input /models/llama32-1b-speech --output /ckpt/llama32-1b-speech
#   sbatch slurm/convert.sh megatron-to-hf --input /ckpt/pt-1b --output /exports/pt-1b --verify
#
# Everything after the direction goes to the converter. Variables (docs/slurm.md): PYTHON,
# CONTAINER_IMAGE, CONTAINER_MOUNTS, CONTAINER_WORKDIR, SRUN_ARGS, MASTER_PORT, DRY_RUN, REPO.
#SBATCH --job-name=speechlm-convert
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --time=02:00:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# sbatch runs a spooled copy of this file: find the checkout through REPO or the submit dir.
repo=${REPO:-${SLURM_SUBMIT_DIR:-}}
[[ -n $repo && -f $repo/slurm/common.sh ]] || repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=slurm/common.sh
source "$repo/slurm/common.sh"
REPO=${REPO:-$repo}

parse_common_args "$@"
set -- "${ARGS[@]}"
direction=${1:-}
shift || true
find_repo
case $direction in
    hf-to-megatron)
        TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-1}
        script=conversion/hf_to_megatron.py
        ;;
    megatron-to-hf)
        TASKS_PER_NODE=1 NODES=1
        script=conversion/megatron_to_hf.py
        ;;
    *) die "usage: sbatch slurm/convert.sh hf-to-megatron|megatron-to-hf --input ... --output ... [converter flags]" ;;
esac
setup_env
launcher_cmd
[[ $direction == megatron-to-hf ]] && { LAUNCH+=(--ntasks=1); WORLD=1; }
rank_cmd "$PYTHON" "$script" "$@"
if ((DRY_RUN)); then
    print_dry_run
    exit 0
fi
log "$direction on ${SLURM_JOB_NODELIST:-localhost}: $WORLD task(s)"
"${LAUNCH[@]}" "${TASK[@]}"
