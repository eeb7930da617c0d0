#!/usr/bin/env bash
# Start a single-node SLURM cluster on localhost for CI: munged (unless one already runs),
# slurmctld and slurmd, all configured under one directory.
#
#   .ci/slurm/start.sh DIR        # then: export SLURM_CONF=DIR/slurm.conf
#
# Writes DIR/slurm.conf, gres.conf, plugstack.conf and the pyxis stub; records the pid of every
# daemon it started in DIR/*.pid so stop.sh stops exactly those and nothing else.
# Environment: SLURMCTLD_PORT (6817), SLURMD_PORT (6818).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${1:?usage: start.sh DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
export SLURM_CONF=$dir/slurm.conf

log() { echo "slurm-ci: $*" >&2; }

die() {
    log "$*"
    for f in slurmctld.log slurmd.log; do
        [[ -f $dir/$f ]] && { echo "--- $dir/$f" >&2; tail -n 20 "$dir/$f" >&2; }
    done
    exit 1
}

# A pid file names a live daemon (daemons reparent to PID 1 and linger as zombies for a
# moment after they exit, so kill -0 alone would lie).
alive() { [[ -r /proc/$1/stat ]] && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]; }

write_config() {
    local cpus i
    cpus=$(nproc)
    # Old job ids and node state would come back from a previous run's state directory.
    rm -rf "$dir/state" "$dir/spool" "$dir"/slurm*.log
    mkdir -p "$dir/state" "$dir/spool"
    sed -e "s|@DIR@|$dir|g" -e "s|@PORT_CTLD@|${SLURMCTLD_PORT:-6817}|" \
        -e "s|@PORT_D@|${SLURMD_PORT:-6818}|" -e "s|@CPUS@|$cpus|" \
        "$here/slurm.conf.in" >"$dir/slurm.conf"
    sed -e "s|@DIR@|$dir|g" "$here/gres.conf.in" >"$dir/gres.conf"
    # SLURM wants a character device per GPU: copies of /dev/null (1,3) where mknod is allowed,
    # plain files otherwise (slurmd then logs an error per file but still counts them).
    rm -rf "$dir/fake-gpu"
    mkdir -p "$dir/fake-gpu"
    for i in 0 1 2 3 4 5 6 7; do
        mknod -m 0666 "$dir/fake-gpu/nvidia$i" c 1 3 2>/dev/null || touch "$dir/fake-gpu/nvidia$i"
    done
    sed -e "s|@DIR@|$dir|g" "$here/plugstack.conf.in" >"$dir/plugstack.conf"
    gcc -shared -fPIC -O2 -Wall -o "$dir/spank_pyxis_stub.so" "$here/spank_pyxis_stub.c"
}

start_munge() {
    # Reuse a running munged (a developer machine may have one); start our own otherwise.
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already running: reusing it (stop.sh will leave it alone)"
        return
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --force
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$dir/munged.pid"
    munge -n | unmunge >/dev/null || die "munge does not work"
}

start_daemons() {
    local pf
    for pf in slurmctld.pid slurmd.pid; do
        # A second slurmd with the same pid file kills the first: refuse instead.
        if [[ -s $dir/$pf ]] && alive "$(cat "$dir/$pf")"; then
            die "$dir/$pf names a running daemon: run stop.sh $dir first"
        fi
    done
    /usr/sbin/slurmctld -f "$SLURM_CONF"
    /usr/sbin/slurmd -f "$SLURM_CONF" -N localhost
}

wait_idle() {
    local i
    for ((i = 0; i < 150; i++)); do
        [[ $(sinfo -h -o %T 2>/dev/null) == idle ]] && return 0
        sleep 0.1
    done
    sinfo >&2 || true
    die "the node never became idle"
}

write_config
start_munge
start_daemons
wait_idle
log "cluster up: export SLURM_CONF=$SLURM_CONF"
