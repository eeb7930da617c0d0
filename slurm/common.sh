# Shared by the sbatch scripts in slurm/ (sourced, not run). See docs/slurm.md.
#
# What it gives the scripts:
#   find_repo                 REPO: the checkout the job runs from
#   setup_env                 PYTHON, OMP/NCCL defaults, MASTER_ADDR/MASTER_PORT
#   launcher_cmd              LAUNCH: srun [+ pyxis container flags], as an array
#   rank_cmd CMD...           TASK: CMD wrapped so each task exports RANK/LOCAL_RANK/WORLD_SIZE
#   print_dry_run             the exact command of every rank, nothing run
#   run_step_with_requeue     run "${LAUNCH[@]}" "${TASK[@]}", forward the pre-time-limit
#                             signal to the tasks, requeue the job after they checkpointed
# shellcheck shell=bash

log() { echo "[slurm $(date +%H:%M:%S)] $*"; }
die() { echo "[slurm] error: $*" >&2; exit 2; }

# The checkout to run. sbatch runs a copy of the script from its spool directory, so the
# script's own path says nothing: REPO, else the submit directory when it is a checkout, else
# (outside SLURM) the directory above this file.
find_repo() {
    if [[ -z ${REPO:-} ]]; then
        if [[ -n ${SLURM_SUBMIT_DIR:-} && -f ${SLURM_SUBMIT_DIR}/slurm/common.sh ]]; then
            REPO=$SLURM_SUBMIT_DIR
        else
            REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
        fi
    fi
    [[ -f $REPO/slurm/common.sh ]] || die "REPO=$REPO is not a speechlm checkout: submit from the checkout or set REPO"
    export REPO
}

# --dry-run anywhere in the arguments, or DRY_RUN=1: print, do not run. Sets ARGS to the rest.
parse_common_args() {
    ARGS=()
    DRY_RUN=${DRY_RUN:-0}
    local a
    for a in "$@"; do
        if [[ $a == --dry-run ]]; then DRY_RUN=1; else ARGS+=("$a"); fi
    done
}

# Settings every task inherits (srun exports the batch environment to the tasks). Each one
# only when the user has not set it.
setup_env() {
    # In the image, `python` is the container's; on the host, name an environment's python.
    PYTHON=${PYTHON:-python}
    # torchrun sets 1 thread per process; srun launches the ranks directly, so do the same:
    # 8 ranks x all cores of OpenMP threads would oversubscribe the node.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    export PYTHONUNBUFFERED=1
    # NCCL: only what is safe on any cluster (docs/slurm.md lists the site-specific ones).
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

    NNODES=${SLURM_JOB_NUM_NODES:-${NODES:-1}}
    # Outside a job (a dry run on a login node) assume the scripts' 8 tasks per node.
    TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-${TASKS_PER_NODE:-8}}
    TASKS_PER_NODE=${TASKS_PER_NODE%%(*}  # "8(x2)" -> 8
    WORLD=${SLURM_NTASKS:-$((NNODES * TASKS_PER_NODE))}
    if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
        mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    else
        HOSTS=()
        local i
        for ((i = 0; i < NNODES; i++)); do HOSTS+=("node$i"); done
    fi
    export MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}
    # From the job id, so two jobs sharing a node do not collide (requeues keep the id).
    export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
}

# LAUNCH: the srun line. One task per GPU (the allocation's --ntasks-per-node); with
# CONTAINER_IMAGE through pyxis, without it in the current environment.
launcher_cmd() {
    LAUNCH=(srun --kill-on-bad-exit=1 --export=ALL)
    # srun in Slurm >= 22.05 no longer inherits --cpus-per-task from sbatch: give each task its
    # share of the node for data-loader workers (exclusive jobs get all the node's CPUs).
    if [[ -n ${SLURM_CPUS_ON_NODE:-} ]]; then
        local cpt=$((SLURM_CPUS_ON_NODE / TASKS_PER_NODE))
        ((cpt >= 1)) && LAUNCH+=("--cpus-per-task=$cpt")
    fi
    if [[ -n ${CONTAINER_IMAGE:-} ]]; then
        LAUNCH+=("--container-image=$CONTAINER_IMAGE")
        if [[ -n ${CONTAINER_MOUNTS:-} ]]; then
            LAUNCH+=("--container-mounts=$CONTAINER_MOUNTS")
        else
            # Without mounts, checkpoints and datasets written in the container are lost with it.
            log "warning: CONTAINER_IMAGE without CONTAINER_MOUNTS: only the image's own files are visible to the tasks" >&2
        fi
        # The image holds the code at /opt/speechlm (Dockerfile WORKDIR).
        LAUNCH+=("--container-workdir=${CONTAINER_WORKDIR:-/opt/speechlm}")
    else
        LAUNCH+=("--chdir=$REPO")
    fi
    if [[ -n ${SRUN_ARGS:-} ]]; then
        local extra
        read -r -a extra <<<"$SRUN_ARGS"
        LAUNCH+=("${extra[@]}")
    fi
}

# TASK: the command each task runs. Ranks come from srun's task variables, read inside the task
# (they differ per task, so they cannot be set in the batch shell).
rank_cmd() {
    # shellcheck disable=SC2016  # expanded by the task's shell, not here
    TASK=(bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' rank "$@")
}

# Every rank's exact command line, as it would run, without running anything.
print_dry_run() {
    local r node local_rank
    echo "# dry run: nothing is launched"
    echo "# launcher: $(printf '%q ' "${LAUNCH[@]}")"
    for ((r = 0; r < WORLD; r++)); do
        node=$((r / TASKS_PER_NODE))
        local_rank=$((r % TASKS_PER_NODE))
        printf 'rank %d on %s: RANK=%d LOCAL_RANK=%d WORLD_SIZE=%d MASTER_ADDR=%s MASTER_PORT=%s %s\n' \
            "$r" "${HOSTS[$node]:-node$node}" "$r" "$local_rank" "$WORLD" "$MASTER_ADDR" "$MASTER_PORT" \
            "$(printf '%q ' "${TASK[@]:4}")"
    done
}

# Preemption and time limits. SLURM sends SIGUSR1 to this batch shell before the time limit
# (#SBATCH --signal=B:USR1@...), and SIGTERM on scancel or preemption. The shell forwards
# SIGUSR1 to srun, which passes it on to every task (srun would turn a SIGTERM into SIGKILL);
# speechlm.train treats SIGUSR1 as SIGTERM: it saves a checkpoint and exits 0. After SIGUSR1,
# once all tasks are gone, the job requeues itself (at most MAX_REQUEUES times) and the next run
# resumes from checkpoint.save; after SIGTERM it ends (a cancel must stay a cancel).
STOP_SIGNAL=""
STEP_PID=""

_on_stop_signal() {
    if [[ -n $STOP_SIGNAL ]]; then
        log "received SIG$1 again: already stopping"
        return
    fi
    STOP_SIGNAL=$1
    log "received SIG$1: asking the tasks to checkpoint and exit"
    [[ -n $STEP_PID ]] && kill -USR1 "$STEP_PID" 2>/dev/null || true
}

run_step_with_requeue() {
    local restarts=${SLURM_RESTART_COUNT:-0} max=${MAX_REQUEUES:-20} rc=0
    log "job ${SLURM_JOB_ID:-?} run $((restarts + 1)) (SLURM_RESTART_COUNT=$restarts, MAX_REQUEUES=$max)" \
        "on ${SLURM_JOB_NODELIST:-?}: $WORLD ranks, MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
    log "launch: $(printf '%q ' "${LAUNCH[@]}") ... $(printf '%q ' "${TASK[@]:4}")"
    trap '_on_stop_signal USR1' USR1
    trap '_on_stop_signal TERM' TERM
    "${LAUNCH[@]}" "${TASK[@]}" &
    STEP_PID=$!
    # A signal that came while the shell was still preparing had no step to go to.
    [[ -n $STOP_SIGNAL ]] && { kill -USR1 "$STEP_PID" 2>/dev/null || true; }
    # A trapped signal interrupts `wait` (status > 128) while the step still runs: wait again
    # until the step itself has ended, and keep its exit status.
    while :; do
        rc=0
        wait "$STEP_PID" || rc=$?
        kill -0 "$STEP_PID" 2>/dev/null || break
    done
    STEP_PID=""
    trap - USR1 TERM

    if [[ -z $STOP_SIGNAL ]]; then
        log "tasks finished with exit code $rc"
        return "$rc"
    fi
    log "tasks stopped after SIG$STOP_SIGNAL with exit code $rc"
    # SIGTERM comes from scancel (and from preemption, where SLURM requeues the job itself when
    # PreemptMode=REQUEUE): the ranks have checkpointed; requeueing would undo a cancel.
    if [[ -z ${SLURM_JOB_ID:-} || $STOP_SIGNAL == TERM ]]; then
        return "$rc"
    fi
    if ((restarts >= max)); then
        log "not requeueing: MAX_REQUEUES=$max reached; resubmit the same job to continue from the checkpoint"
        return 1
    fi
    log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $max)"
    # The job is requeued as soon as this returns; nothing after it is guaranteed to run.
    scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed (preempted jobs are requeued by SLURM itself)"
    return 0
}

# The body of pretrain.sh and sft.sh: one srun step of speechlm.train (or TRAIN_MODULE) with
# the recipe, the path variables as overrides, then OVERRIDES, then the script's arguments.
train_main() {
    parse_common_args "$@"
    find_repo
    setup_env
    local recipe=${RECIPE:?set RECIPE to a recipe YAML (recipes/*.yaml)}
    if [[ -z ${CONTAINER_IMAGE:-} && ! -f $REPO/$recipe && ! -f $recipe ]]; then
        die "recipe not found: $recipe (RECIPE is relative to the checkout, or absolute)"
    fi
    local overrides=()
    [[ -n ${HF_MODEL:-} ]] && overrides+=("speechlm.hf_model=$HF_MODEL")
    [[ -n ${BLEND:-} ]] && overrides+=("speechlm.blend=$BLEND")
    [[ -n ${CKPT_DIR:-} ]] && overrides+=("checkpoint.save=$CKPT_DIR")
    [[ -n ${PRETRAINED_CHECKPOINT:-} ]] && overrides+=("checkpoint.pretrained_checkpoint=$PRETRAINED_CHECKPOINT")
    if [[ -n ${OVERRIDES:-} ]]; then
        local extra
        read -r -a extra <<<"$OVERRIDES"
        overrides+=("${extra[@]}")
    fi
    launcher_cmd
    rank_cmd "$PYTHON" -m "${TRAIN_MODULE:-speechlm.train}" --config "$recipe" "${overrides[@]}" "${ARGS[@]}"
    if ((DRY_RUN)); then
        print_dry_run
        return 0
    fi
    run_step_with_requeue
}

# The body of prep_speech.sh and prep_text.sh. As an array job each element builds its share of
# the inputs (--num-tasks/--task-index from the array); the first element submits the merge as a
# job that starts once every element has succeeded (afterok on the whole array). A single
# (non-array) job builds everything and merges by itself.
#   prep_main BUILDER MERGE_FLAG_OR_SCRIPT ARGS...
# BUILDER: data_prep/build_*.py; MERGE: how to merge (a script path, or "--merge" for BUILDER).
prep_main() {
    local builder=$1 merge=$2
    shift 2
    parse_common_args "$@"
    find_repo
    TASKS_PER_NODE=1 NODES=1
    setup_env
    local output=${OUTPUT:?set OUTPUT to the dataset directory}
    local args=("--output" "$output")
    [[ -n ${INPUT:-} ]] && { local inputs; read -r -a inputs <<<"$INPUT"; args+=(--input "${inputs[@]}"); }
    [[ -n ${MODEL:-} ]] && args+=(--model "$MODEL")
    if [[ -n ${PREP_ARGS:-} ]]; then
        local extra
        read -r -a extra <<<"$PREP_ARGS"
        args+=("${extra[@]}")
    fi
    args+=("${ARGS[@]}")
    launcher_cmd
    LAUNCH+=(--ntasks=1)

    if [[ ${PREP_MODE:-build} == merge ]]; then
        if [[ $merge == --merge ]]; then
            rank_cmd "$PYTHON" "$builder" --merge --output "$output"
        else
            rank_cmd "$PYTHON" "$merge" --output "$output"
        fi
    else
        local count=${SLURM_ARRAY_TASK_COUNT:-1}
        local index=$((${SLURM_ARRAY_TASK_ID:-0} - ${SLURM_ARRAY_TASK_MIN:-0}))
        rank_cmd "$PYTHON" "$builder" "${args[@]}" --num-tasks "$count" --task-index "$index"
        if ((count > 1 && index == 0 && ${SLURM_RESTART_COUNT:-0} == 0)) && [[ ${MERGE:-auto} != no ]]; then
            submit_merge "${ARGS[@]}"
        fi
    fi
    if ((DRY_RUN)); then
        print_dry_run
        return 0
    fi
    log "${PREP_MODE:-build} on ${SLURM_JOB_NODELIST:-localhost}: $(printf '%q ' "${TASK[@]:4}")"
    "${LAUNCH[@]}" "${TASK[@]}"
}

# The merge job: this same script again with PREP_MODE=merge, once the whole array succeeded.
# It gets this element's partition/account/QOS/CPUs (sbatch flags given at submission are not
# inherited otherwise), plus MERGE_SBATCH_ARGS. An element that fails leaves the dependency
# unsatisfiable: the merge job is then cancelled instead of pending forever; rerun the failed
# elements, then merge by hand (PREP_MODE=merge sbatch slurm/prep_*.sh, same variables).
submit_merge() {
    local script
    script=$REPO/slurm/${PREP_SCRIPT:?}
    local cmd=(sbatch --parsable --dependency="afterok:${SLURM_ARRAY_JOB_ID}" --kill-on-invalid-dep=yes
        --job-name="${SLURM_JOB_NAME:-prep}-merge" --export="ALL,PREP_MODE=merge")
    [[ -n ${SLURM_JOB_PARTITION:-} ]] && cmd+=("--partition=$SLURM_JOB_PARTITION")
    [[ -n ${SLURM_JOB_ACCOUNT:-} ]] && cmd+=("--account=$SLURM_JOB_ACCOUNT")
    [[ -n ${SLURM_JOB_QOS:-} ]] && cmd+=("--qos=$SLURM_JOB_QOS")
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && cmd+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
    if [[ -n ${MERGE_SBATCH_ARGS:-} ]]; then
        local extra
        read -r -a extra <<<"$MERGE_SBATCH_ARGS"
        cmd+=("${extra[@]}")
    fi
    cmd+=("$script" "$@")
    if ((DRY_RUN)); then
        echo "# merge job: $(printf '%q ' "${cmd[@]}")"
        return
    fi
    local id
    id=$("${cmd[@]}")
    log "merge job $id submitted: starts when every element of array job $SLURM_ARRAY_JOB_ID has succeeded"
}
