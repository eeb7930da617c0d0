#!/usr/bin/env bash
# Text-to-speech fine-tuning (SFT) on 8-GPU nodes: the same launcher as pretrain.sh (one task
# per GPU, resumes from its checkpoint, requeues itself before the time limit) with the SFT
# recipe (`speechlm.mode: sft`: speechlm.train runs Bridge's finetune(), docs/sft.md).
# Every #SBATCH line can be overridden on the sbatch command line.
#
#   HF_MODEL=/models/llama32-1b-speech BLEND=/data/tts-blend.yaml \
#   PRETRAINED_CHECKPOINT=/ckpt/pt-1b CKPT_DIR=/ckpt/sft-1b \
#   CONTAINER_IMAGE=/images/speechlm.sqsh CONTAINER_MOUNTS=/lustre:/lustre \
#       sbatch --nodes=2 slurm/sft.sh [--dry-run] [key=value ...]
#
# Variables (docs/slurm.md): RECIPE (recipes/sft_llama32_1b.yaml), HF_MODEL, BLEND,
# CKPT_DIR, PRETRAINED_CHECKPOINT, OVERRIDES, TRAIN_MODULE, PYTHON, CONTAINER_IMAGE,
# CONTAINER_MOUNTS, CONTAINER_WORKDIR, SRUN_ARGS, MASTER_PORT, MAX_REQUEUES, DRY_RUN, REPO.
#SBATCH --job-name=speechlm-sft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
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

RECIPE=${RECIPE:-recipes/sft_llama32_1b.yaml}
train_main "$@"
