#!/usr/bin/env bash
# Stop the daemons .ci/slurm/start.sh started (by the pid files it wrote), nothing else.
#
#   .ci/slurm/stop.sh DIR
set -euo pipefail

dir=${1:?usage: stop.sh DIR}
export SLURM_CONF=$dir/slurm.conf

alive() { [[ -r /proc/$1/stat ]] && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]; }

# Cancel what is left so slurmd tears its job steps down before it goes.
if [[ -s $dir/slurmctld.pid ]] && alive "$(cat "$dir/slurmctld.pid")"; then
    scancel --quiet --user="$(id -un)" 2>/dev/null || true
fi

pids=()
for pf in slurmd.pid slurmctld.pid munged.pid; do
    if [[ -s $dir/$pf ]]; then
        pid=$(cat "$dir/$pf")
        alive "$pid" && { kill -TERM "$pid" || true; pids+=("$pid"); }
    fi
done

# Stopped daemons linger as zombies of PID 1 for a moment: poll /proc state, not kill -0.
for ((i = 0; i < 100; i++)); do
    left=0
    for pid in "${pids[@]}"; do alive "$pid" && left=1; done
    ((left)) || break
    sleep 0.1
done
for pid in "${pids[@]}"; do
    if alive "$pid"; then
        echo "slurm-ci: force-killing $pid" >&2
        kill -KILL "$pid" || true
    fi
done
rm -f "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munged.pid"
