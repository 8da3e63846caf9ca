#!/usr/bin/env bash
# A cluster of N test hosts on this one machine, for the multi-host tests (and for
# trying the launchers across nodes by hand).
#
#   scripts/test-cluster.sh up N    start N hosts (N >= 2); idempotent for the same N
#   scripts/test-cluster.sh status  one line per host; exit 0 only if all are up
#   scripts/test-cluster.sh env     `export` lines for the FORGE_CLUSTER_* variables
#   scripts/test-cluster.sh down    remove everything `up` made
#   scripts/test-cluster.sh cut HOST / heal HOST   take HOST's link down / up again
#   scripts/test-cluster.sh slurm   start SLURM across the hosts (after `up`); idempotent
#
# Each host is a network namespace on one bridge, with its own hostname (UTS namespace)
# and its own node-local /scratch: a tmpfs in a mount namespace, the same path with other
# contents on every host. One shared folder has the same path on every host, as an NFS
# mount would; an S3 endpoint (moto's server) listens on the bridge, where every host
# reaches it. The hosts' names are in an /etc/hosts that each host sees in place of the
# machine's. `env` prints:
#   FORGE_CLUSTER_HOSTS   host names, space-separated, resolvable inside every host
#   FORGE_CLUSTER_AGENT   runs `AGENT HOST COMMAND...` on HOST; usable as mpirun's
#                         launch agent (--prtemca plm_ssh_agent AGENT)
#   FORGE_CLUSTER_SHARED  the shared folder
#   FORGE_CLUSTER_S3      the S3 endpoint's URL (any bucket name; moto creates on demand)
#   FORGE_CLUSTER_ADDRS   the hosts' addresses, in the order of FORGE_CLUSTER_HOSTS
#   FORGE_CLUSTER_SSH     1 when every host runs an sshd (for launchers that use ssh, as
#                         horovodrun does): inside a host, `ssh OTHER-HOST` logs in as
#                         root with the cluster's own key (an ssh_config bound over
#                         /etc/ssh/ssh_config in each host); openssh-server is installed
#                         through apt-get when missing. FORGE_CLUSTER_SSH=0 before `up`
#                         starts none.
#   FORGE_CLUSTER_SLURM_CONF  after `slurm`: SLURM_CONF for sbatch, srun, scontrol and
#                         sinfo, from this machine or from any host. slurmctld runs on the
#                         first host, a slurmd on every host (one node each, named as the
#                         host), with a munged of the cluster's own (its own key and socket),
#                         so a SLURM or munge of the machine's is left alone. slurm-wlm and
#                         munge are installed through apt-get when missing.
#
# FORGE_CLUSTER_NAME (default fdc) prefixes every name made here: namespaces, links, the
# state folder /tmp/forge-cluster-NAME (FORGE_CLUSTER_STATE overrides it); two clusters
# with different names and FORGE_CLUSTER_NET (default 10.77.0: a private /24 used only by
# these namespaces) can run side by side. Teardown finds what to remove from the pid and
# name files written by `up`, never by a process name. Needs root and a kernel with
# network, mount and UTS namespaces.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
NAME="${FORGE_CLUSTER_NAME:-fdc}"
NET="${FORGE_CLUSTER_NET:-10.77.0}"
STATE="${FORGE_CLUSTER_STATE:-/tmp/forge-cluster-$NAME}"
PYTHON="${FORGE_CLUSTER_PYTHON:-$here/../.venv/bin/python}"
BRIDGE="$NAME-br0"
SCRATCH=/scratch
USERS=/tmp/forge-cluster-users

die() { echo "test-cluster: $*" >&2; exit 2; }
# refuse: this machine cannot host the cluster (not root, no namespaces): exit 3, which
# the tests take as a reason to skip, where any other failure fails them.
refuse() { echo "test-cluster: $*" >&2; exit 3; }

[[ "$NAME" =~ ^[a-z][a-z0-9]{0,5}$ ]] || die "FORGE_CLUSTER_NAME must be 1-6 lowercase letters/digits"
[[ "$NET" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "FORGE_CLUSTER_NET must be three octets, e.g. 10.77.0"

host_name() { echo "$NAME-h$1"; }
host_addr() { echo "$NET.$((10 + $1))"; }
hosts_up() { [ -f "$STATE/size" ] && cat "$STATE/size" || echo 0; }

# alive FILE WORD: the pid in FILE, if it names a live process whose command line has WORD
# (so a pid reused by another program is never taken for ours).
alive() {
    local pid
    [ -f "$1" ] || return 1
    pid="$(cat "$1")"
    [ -n "$pid" ] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2" || return 1
    echo "$pid"
}

preflight() {
    [ "$(id -u)" = 0 ] || refuse "needs root (network namespaces, bridges and mounts)"
    for tool in ip nsenter unshare mount; do
        command -v "$tool" >/dev/null || refuse "needs '$tool' (iproute2 / util-linux)"
    done
    [ -e /proc/self/ns/net ] && [ -e /proc/self/ns/mnt ] && [ -e /proc/self/ns/uts ] \
        || refuse "this kernel lacks network, mount or UTS namespaces"
    # One throwaway namespace proves that this kernel and this user may make them.
    local probe="$NAME-probe$$"
    ip netns add "$probe" 2>/dev/null || refuse "cannot create a network namespace here"
    ip netns delete "$probe"
    [ -x "$PYTHON" ] || die "no Python at $PYTHON for the S3 endpoint (run make setup)"
}

write_agent() {
    mkdir -p "$STATE/bin"
    cat > "$STATE/bin/agent.new" <<AGENT
#!/bin/sh
# Written by scripts/test-cluster.sh: run COMMAND on HOST of cluster '$NAME', as ssh would
# (through a shell, with this caller's environment and working directory).
# usage: agent [-x] [-o OPT]... HOST COMMAND...
while [ \$# -gt 0 ]; do
    case "\$1" in -o|-p|-l|-i) shift 2 ;; -*) shift ;; *) break ;; esac
done
[ \$# -ge 1 ] || { echo "agent: usage: agent HOST COMMAND..." >&2; exit 255; }
host="\${1%%:*}"; shift
pidfile="$STATE/\$host.pid"
[ -f "\$pidfile" ] || { echo "agent: no host '\$host' in cluster '$NAME'" >&2; exit 255; }
pid="\$(cat "\$pidfile")"
[ -d "/proc/\$pid" ] || { echo "agent: host '\$host' is down" >&2; exit 255; }
wd="\$(pwd)"
exec nsenter -t "\$pid" -n -m -u -- /bin/sh -c "cd '\$wd' 2>/dev/null; \$*"
AGENT
    chmod 755 "$STATE/bin/agent.new"
    mv "$STATE/bin/agent.new" "$STATE/bin/agent"
}

start_s3() {
    alive "$STATE/s3.pid" moto.server >/dev/null && return 0
    local port
    port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("'"$NET.1"'", 0)); print(s.getsockname()[1])')"
    setsid "$PYTHON" -m moto.server -H "$NET.1" -p "$port" > "$STATE/s3.log" 2>&1 < /dev/null &
    echo $! > "$STATE/s3.pid"
    echo "http://$NET.1:$port" > "$STATE/s3.url"
    for _ in $(seq 100); do
        "$PYTHON" -c 'import socket, sys; socket.create_connection(("'"$NET.1"'", '"$port"'), 1)' \
            2>/dev/null && return 0
        sleep 0.1
    done
    die "the S3 endpoint did not start: $(tail -3 "$STATE/s3.log")"
}

start_host() {  # start_host I
    local i="$1" host addr
    host="$(host_name "$i")"
    addr="$(host_addr "$i")"
    if alive "$STATE/$host.pid" "sleep infinity" >/dev/null; then return 0; fi
    ip netns add "$host" 2>/dev/null || true
    echo "$host" >> "$STATE/netns"
    ip link add "$NAME-v$i" type veth peer name eth0 netns "$host" 2>/dev/null || true
    echo "$NAME-v$i" >> "$STATE/links"
    ip link set "$NAME-v$i" master "$BRIDGE" up
    ip -n "$host" addr replace "$addr/24" dev eth0
    ip -n "$host" link set lo up
    ip -n "$host" link set eth0 up
    rm -f "$STATE/$host.pid"
    # The holder: a process in the host's network, mount and UTS namespaces, which the
    # agent enters. Its mounts (/scratch, /etc/hosts) exist only in that mount namespace.
    setsid nsenter --net="/run/netns/$host" -- unshare --mount --uts --propagation private \
        /bin/sh -c "hostname '$host' && mount -t tmpfs -o size=1g,mode=1777 '$host-scratch' '$SCRATCH' \
            && mount --bind '$STATE/hosts' /etc/hosts \
            && { [ ! -f '$STATE/ssh/ssh_config' ] || mount --bind '$STATE/ssh/ssh_config' /etc/ssh/ssh_config; } \
            && echo \$\$ > '$STATE/$host.pid.new' \
            && mv '$STATE/$host.pid.new' '$STATE/$host.pid' && exec sleep infinity" \
        > "$STATE/$host.log" 2>&1 < /dev/null &
    for _ in $(seq 100); do
        alive "$STATE/$host.pid" "sleep infinity" >/dev/null && return 0
        sleep 0.05
    done
    die "host $host did not start: $(cat "$STATE/$host.log")"
}

want_ssh() { [ "${FORGE_CLUSTER_SSH:-1}" != 0 ]; }

# The cluster's own keys and client configuration, made before the hosts start (each
# host binds the ssh_config over /etc/ssh/ssh_config in its mount namespace).
ssh_keys() {  # ssh_keys N
    want_ssh && [ -f /etc/ssh/ssh_config ] || return 0
    local dir="$STATE/ssh"
    mkdir -p "$dir" && chmod 700 "$dir"
    [ -f "$dir/id_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -C "forge-cluster-$NAME" -f "$dir/id_ed25519"
    [ -f "$dir/host_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -C "$NAME-host" -f "$dir/host_ed25519"
    cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
    for i in $(seq "$1"); do
        echo "$(host_name "$i"),$(host_addr "$i") $(cut -d' ' -f1-2 "$dir/host_ed25519.pub")"
    done > "$dir/known_hosts"
    cat > "$dir/ssh_config" <<CONFIG
# Written by scripts/test-cluster.sh for the hosts of cluster '$NAME'.
Host *
    IdentityFile $dir/id_ed25519
    UserKnownHostsFile $dir/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 10
CONFIG
    cat > "$dir/sshd_config" <<CONFIG
# Written by scripts/test-cluster.sh: one sshd per host of cluster '$NAME', root by key only.
HostKey $dir/host_ed25519
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
CONFIG
}

# One sshd per host, listening on the host's address; installs openssh-server first
# when it is missing. Its pid file is under $STATE/ssh; `down` kills it with the host.
start_sshd() {  # start_sshd N
    want_ssh || return 0
    if ! [ -x /usr/sbin/sshd ]; then
        command -v apt-get >/dev/null || die "no sshd here (install openssh-server, or FORGE_CLUSTER_SSH=0)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends openssh-server; } >&2 || die "could not install openssh-server"
    fi
    [ -f "$STATE/ssh/sshd_config" ] || die "no ssh configuration (is /etc/ssh/ssh_config missing?)"
    if [ ! -d /run/sshd ]; then  # sshd's privilege separation folder; the last down removes it
        mkdir -p /run/sshd
        touch "$USERS/.made-run-sshd"
    fi
    local host pidfile
    for i in $(seq "$1"); do
        host="$(host_name "$i")"
        pidfile="$STATE/ssh/$host.sshd.pid"
        alive "$pidfile" sshd >/dev/null && continue
        "$STATE/bin/agent" "$host" /usr/sbin/sshd -f "$STATE/ssh/sshd_config" \
            -o "ListenAddress=$(host_addr "$i")" -o "PidFile=$pidfile" \
            -E "$STATE/ssh/$host.sshd.log" || die "sshd did not start on $host"
        for _ in $(seq 100); do alive "$pidfile" sshd >/dev/null && break; sleep 0.05; done
        alive "$pidfile" sshd >/dev/null || die "sshd did not start on $host: $(tail -3 "$STATE/ssh/$host.sshd.log")"
    done
    echo 1 > "$STATE/ssh/up"
}

# SLURM across the hosts: every daemon runs inside a host, so `down` ends them with it.
start_slurm() {
    local n dir="$STATE/slurm" first host
    n="$(hosts_up)"
    [ "$n" != 0 ] || die "cluster '$NAME' is down (run: $0 up N first)"
    [ "$(id -u)" = 0 ] || refuse "needs root"
    "$here/../slurm/local-cluster.sh" install || die "could not install slurm-wlm and munge"
    first="$(host_name 1)"
    mkdir -p "$dir/state"
    chmod 755 "$dir"  # munged wants its socket's folder open to everyone (not writable)
    if [ ! -f "$dir/munge.key" ]; then
        head -c 1024 /dev/urandom > "$dir/munge.key.new"
        chmod 400 "$dir/munge.key.new"
        mv "$dir/munge.key.new" "$dir/munge.key"
    fi
    {
        echo "# Written by scripts/test-cluster.sh: SLURM across the $n hosts of cluster '$NAME'."
        echo "ClusterName=$NAME"
        echo "SlurmctldHost=$first($(host_addr 1))"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        # A requeued job waits out its old credential (default 120 s) before it starts.
        echo "AuthInfo=socket=$dir/munge.socket,cred_expire=10"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "MpiDefault=none"
        echo "ReturnToService=2"
        echo "SchedulerType=sched/backfill"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_CPU"
        echo "StateSaveLocation=$dir/state"
        echo "SlurmdSpoolDir=$dir/spool-%n"
        echo "SlurmctldPidFile=$dir/slurmctld.pid"
        echo "SlurmdPidFile=$dir/slurmd-%n.pid"
        echo "SlurmctldLogFile=$dir/slurmctld.log"
        echo "SlurmdLogFile=$dir/slurmd-%n.log"
        echo "SlurmctldPort=6817"
        echo "SlurmdPort=6818"
        echo "JobCompType=jobcomp/none"
        for i in $(seq "$n"); do
            echo "NodeName=$(host_name "$i") NodeAddr=$(host_addr "$i") CPUs=$(nproc) State=UNKNOWN"
        done
        echo "PartitionName=hosts Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
    } > "$dir/slurm.conf"
    alive "$dir/munged.pid" munged >/dev/null \
        || "$STATE/bin/agent" "$first" /usr/sbin/munged --force --socket="$dir/munge.socket" \
            --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
            --seed-file="$dir/munged.seed" --log-file="$dir/munged.log" \
        || die "munged did not start: $(tail -3 "$dir/munged.log" 2>/dev/null)"
    # Daemons must not hold the caller's stdout/stderr open (a caller reading to EOF
    # would wait forever).
    alive "$dir/slurmctld.pid" slurmctld >/dev/null \
        || "$STATE/bin/agent" "$first" /usr/sbin/slurmctld -f "$dir/slurm.conf" \
            < /dev/null >> "$dir/daemons.out" 2>&1 \
        || die "slurmctld did not start: $(tail -3 "$dir/daemons.out")"
    for i in $(seq "$n"); do
        host="$(host_name "$i")"
        alive "$dir/slurmd-$host.pid" slurmd >/dev/null \
            || "$STATE/bin/agent" "$host" /usr/sbin/slurmd -f "$dir/slurm.conf" \
                < /dev/null >> "$dir/daemons.out" 2>&1 \
            || die "slurmd did not start on $host: $(tail -3 "$dir/daemons.out")"
    done
    local idle
    for _ in $(seq 120); do
        idle="$(SLURM_CONF="$dir/slurm.conf" sinfo -h -N -o '%T' 2>/dev/null | grep -Ec '^(idle|mixed|allocated)$' || true)"
        if [ "$idle" = "$n" ]; then
            echo "$dir/slurm.conf" > "$dir/up"
            return 0
        fi
        sleep 0.5
    done
    die "SLURM did not bring up $n nodes within 60 s: $(tail -3 "$dir/slurmctld.log" 2>/dev/null)"
}

up() {
    local n="${1:-}"
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 2 ] && [ "$n" -le 16 ] || die "usage: up N (2 <= N <= 16)"
    local have
    have="$(hosts_up)"
    if [ "$have" != 0 ] && [ "$have" != "$n" ]; then
        die "cluster '$NAME' has $have hosts; run 'down' first to start $n"
    fi
    preflight
    mkdir -p "$STATE" "$STATE/shared"
    chmod 1777 "$STATE/shared"
    # Every cluster's hosts mount their /scratch on this one empty folder; the last
    # cluster down removes it if one of them made it (USERS says which are up).
    mkdir -p "$USERS"
    if [ ! -d "$SCRATCH" ]; then
        mkdir "$SCRATCH"
        touch "$USERS/.made-scratch"
    fi
    touch "$USERS/$NAME"
    {
        echo "127.0.0.1 localhost"
        for i in $(seq "$n"); do echo "$(host_addr "$i") $(host_name "$i")"; done
    } > "$STATE/hosts"
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        echo "$BRIDGE" >> "$STATE/links"
    fi
    ip addr replace "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    echo "$n" > "$STATE/size"
    ssh_keys "$n"
    for i in $(seq "$n"); do start_host "$i"; done
    write_agent
    start_s3
    start_sshd "$n"
    status >/dev/null || die "cluster '$NAME' did not come up: $(status 2>&1 | tr '\n' ' ')"
}

status() {
    local n ok=0 host
    n="$(hosts_up)"
    [ "$n" != 0 ] || { echo "cluster '$NAME': down"; return 1; }
    for i in $(seq "$n"); do
        host="$(host_name "$i")"
        if pid="$(alive "$STATE/$host.pid" "sleep infinity")"; then
            local link
            link="$(ip -br link show "$NAME-v$i" 2>/dev/null | awk '{print $2}')"
            echo "$host $(host_addr "$i") pid $pid link ${link:-missing}"
            [ "$link" = UP ] || [ "$link" = LOWERLAYERDOWN ] || ok=1
            if [ -f "$STATE/ssh/up" ] && ! alive "$STATE/ssh/$host.sshd.pid" sshd >/dev/null; then
                echo "$host sshd not running"
                ok=1
            fi
        else
            echo "$host $(host_addr "$i") not running"
            ok=1
        fi
    done
    if [ -f "$STATE/slurm/up" ]; then
        if SLURM_CONF="$STATE/slurm/slurm.conf" sinfo -h -N -o '%N %T' > "$STATE/slurm/sinfo" 2>&1; then
            sed 's/^/slurm node /' "$STATE/slurm/sinfo"
        else
            echo "slurm not answering: $(head -1 "$STATE/slurm/sinfo")"
            ok=1
        fi
    fi
    if alive "$STATE/s3.pid" moto.server >/dev/null; then
        echo "s3 $(cat "$STATE/s3.url")"
    else
        echo "s3 not running"
        ok=1
    fi
    return "$ok"
}

env_lines() {
    local n hosts="" addrs=""
    n="$(hosts_up)"
    [ "$n" != 0 ] || die "cluster '$NAME' is down (run: $0 up N)"
    for i in $(seq "$n"); do
        hosts="$hosts${hosts:+ }$(host_name "$i")"
        addrs="$addrs${addrs:+ }$(host_addr "$i")"
    done
    echo "export FORGE_CLUSTER_HOSTS='$hosts'"
    echo "export FORGE_CLUSTER_ADDRS='$addrs'"
    echo "export FORGE_CLUSTER_AGENT='$STATE/bin/agent'"
    echo "export FORGE_CLUSTER_SHARED='$STATE/shared'"
    echo "export FORGE_CLUSTER_S3='$(cat "$STATE/s3.url" 2>/dev/null)'"
    echo "export FORGE_CLUSTER_SSH='$([ -f "$STATE/ssh/up" ] && echo 1 || echo 0)'"
    if [ -f "$STATE/slurm/up" ]; then
        echo "export FORGE_CLUSTER_SLURM_CONF='$(cat "$STATE/slurm/up")'"
    fi
}

stop_pid() {  # stop_pid FILE WORD: SIGTERM, then SIGKILL, the process FILE names
    local pid
    pid="$(alive "$1" "$2")" || { rm -f "$1"; return 0; }
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$1"
}

down() {
    [ -d "$STATE" ] || return 0
    [ "$(id -u)" = 0 ] || refuse "needs root"
    stop_pid "$STATE/s3.pid" moto.server
    for file in "$STATE"/*.pid; do
        [ -e "$file" ] || continue
        # Everything still running inside a host (a launched rank, a daemon) goes with it:
        # the processes whose network namespace is that host's.
        local host pid
        host="$(basename "$file" .pid)"
        if [ -e "/run/netns/$host" ]; then
            for pid in $(ip netns pids "$host" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        fi
        stop_pid "$file" "sleep infinity"
    done
    if [ -f "$STATE/netns" ]; then
        sort -u "$STATE/netns" | while read -r ns; do
            ip netns delete "$ns" 2>/dev/null || true
        done
    fi
    if [ -f "$STATE/links" ]; then
        sort -u "$STATE/links" | while read -r link; do
            ip link delete "$link" 2>/dev/null || true
        done
    fi
    rm -f "$USERS/$NAME"
    if [ -z "$(ls "$USERS" 2>/dev/null)" ]; then  # no cluster is left using /scratch
        if [ -f "$USERS/.made-scratch" ]; then rmdir "$SCRATCH" 2>/dev/null || true; fi
        if [ -f "$USERS/.made-run-sshd" ]; then rmdir /run/sshd 2>/dev/null || true; fi
        rm -rf "$USERS"
    fi
    rm -rf "$STATE"
}

link() {  # link HOST up|down
    local host="${1:-}" i
    [[ "$host" =~ ^$NAME-h([0-9]+)$ ]] || die "no host '$host' in cluster '$NAME'"
    i="${BASH_REMATCH[1]}"
    ip link set "$NAME-v$i" "$2"
}

case "${1:-}" in
    up) up "${2:-}" ;;
    status) status ;;
    env) env_lines ;;
    down) down ;;
    cut) link "${2:-}" down ;;
    heal) link "${2:-}" up ;;
    slurm) start_slurm ;;
    *) die "usage: $0 up N | status | env | down | cut HOST | heal HOST | slurm" ;;
esac
