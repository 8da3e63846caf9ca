#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests (and for trying the sbatch
# scripts by hand).
#
#   slurm/local-cluster.sh up       install slurm-wlm and munge if missing, start the daemons
#   slurm/local-cluster.sh status   print sinfo; exit 0 only if the node is up
#   slurm/local-cluster.sh down     stop the daemons
#   slurm/local-cluster.sh env      print `export SLURM_CONF=...` for client commands
#   slurm/local-cluster.sh install  only install slurm-wlm and munge if missing
#                                   (scripts/test-cluster.sh slurm uses it)
#
# Everything but the Debian packages lives in $FORGE_SLURM_DIR (default
# /var/tmp/forge-dist-slurm): config, state, spool, logs and the daemons' pid files.
# Needs root (the daemons run as root here, SlurmUser=root) and apt-get the first time.
# It only ever starts, checks and stops the daemons it started itself (found by their
# pid files), so trying it on a machine that runs its own SLURM leaves that one alone.
set -euo pipefail
DIR="${FORGE_SLURM_DIR:-/var/tmp/forge-dist-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
CPUS="$(nproc)"

die() { echo "local-cluster: $*" >&2; exit 1; }

# our_pid NAME: the pid of the NAME daemon this script started (its pid file names a
# live process called NAME); fails otherwise.
our_pid() {
    local file="$DIR/$1.pid" pid
    [ -f "$file" ] || return 1
    pid="$(cat "$file")"
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] || return 1
    echo "$pid"
}

ours_running() { our_pid slurmctld >/dev/null || our_pid slurmd >/dev/null; }

install() {
    local missing=()
    for pkg in slurm-wlm munge; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "apt-get is needed to install ${missing[*]}"
    echo "local-cluster: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat > "$CONF.new" <<CONF
# Written by slurm/local-cluster.sh for a one-node test cluster.
ClusterName=forge
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits out its old credential before it may start again (default 120 s);
# short here so the preemption test's requeued job starts within seconds.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6917
SlurmdPort=6918
JobCompType=jobcomp/none
NodeName=$HOST CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
    if [ -f "$CONF" ] && cmp -s "$CONF.new" "$CONF"; then
        rm -f "$CONF.new"
        return 0
    fi
    # A changed configuration: our daemons still running with the old one are restarted.
    if ours_running; then
        echo "local-cluster: configuration changed; restarting the daemons" >&2
        down
    fi
    mv "$CONF.new" "$CONF"
}

up() {
    [ "$(id -u)" -eq 0 ] || die "needs root (the test cluster runs its daemons as root)"
    install
    write_conf
    mkdir -p /run/munge "$DIR/log" && chown munge:munge /run/munge
    [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key; }
    if ! pgrep -x munged >/dev/null; then
        # Daemons must not hold the caller's stdout/stderr open (a caller waiting for
        # EOF on them would wait forever).
        runuser -u munge -- /usr/sbin/munged --force </dev/null >>"$DIR/log/munged.out" 2>&1
    fi
    export SLURM_CONF="$CONF"
    our_pid slurmctld >/dev/null \
        || /usr/sbin/slurmctld -f "$CONF" </dev/null >>"$DIR/log/slurmctld.out" 2>&1
    our_pid slurmd >/dev/null \
        || /usr/sbin/slurmd -f "$CONF" </dev/null >>"$DIR/log/slurmd.out" 2>&1
    for _ in $(seq 1 60); do
        if sinfo -h -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
            echo "local-cluster: up ($HOST, $CPUS CPUs); export SLURM_CONF=$CONF" >&2
            return 0
        fi
        scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    tail -5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "the node did not come up within 60 s"
}

down() {
    export SLURM_CONF="$CONF"
    local pids=() name pid
    for name in slurmd slurmctld; do
        if pid="$(our_pid "$name")"; then
            pids+=("$pid")
            kill "$pid" 2>/dev/null || true
        fi
    done
    # Wait until ours are gone, so an `up` right after starts fresh daemons.
    for _ in $(seq 1 30); do
        ours_running || break
        sleep 0.5
    done
    for name in slurmd slurmctld; do
        if pid="$(our_pid "$name")"; then
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/$name.pid"
    done
    echo "local-cluster: down (stopped ${#pids[@]} daemon(s) of its own)" >&2
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) SLURM_CONF="$CONF" sinfo && SLURM_CONF="$CONF" sinfo -h -o '%T' | grep -Eq '^(idle|mixed|allocated)' ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    install) install ;;
    *) die "usage: $0 up|down|status|env|install" ;;
esac
