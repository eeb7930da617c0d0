#!/usr/bin/env bash
# Checkpoint evaluation (python -m speechlm.evaluate, docs/evaluation.md) on one GPU, beside a
# training job: --watch evaluates each checkpoint of the run's save directory as it lands and
# stops once the tracker names the final iteration. Evaluation is resumable, so the job requeues
# itself before its time limit like the training jobs and carries on where it stopped.
#
#   sbatch slurm/evaluate.sh --watch /ckpt/sft-1b --eval-set /data/eval/tts-eval.jsonl --out /evals/sft-1b \
#       --asr /models/whisper-large-v3 --asr hi=/models/indicwhisper-hi --codec /models/xcodec2 \
#       --speaker-model /models/wavlm-base-plus-sv --pin-best 2 --metric cer
#   sbatch --dependency=after:<training job id> slurm/evaluate.sh --watch ...   # start with the training job
#
# Everything (but --dry-run) goes to speechlm.evaluate. Variables (docs/slurm.md): PYTHON,
# CONTAINER_IMAGE, CONTAINER_MOUNTS, CONTAINER_WORKDIR, SRUN_ARGS, MAX_REQUEUES, DRY_RUN, REPO.
#SBATCH --job-name=speechlm-evaluate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
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

parse_common_args "$@"
find_repo
TASKS_PER_NODE=1 NODES=1
setup_env
# One process: the synthesis and the ASR use the GPU's host threads, not one per rank.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}
launcher_cmd
LAUNCH+=(--ntasks=1)
WORLD=1
rank_cmd "$PYTHON" -m speechlm.evaluate "${ARGS[@]}"
if ((DRY_RUN)); then
    print_dry_run
    exit 0
fi
# The evaluator has no checkpoint to write: on the time-limit signal it is stopped, the job
# requeues, and the next run resumes from what --out holds.
run_step_with_requeue
