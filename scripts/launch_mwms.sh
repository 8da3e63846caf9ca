#!/usr/bin/env bash
# Start N local MultiWorkerMirroredStrategy workers, each with its own TF_CONFIG, running
# scripts/train.py (tf_keras: Keras 3 does not run under MWMS). Copy it and adapt.
#
#   NP=2 scripts/launch_mwms.sh --checkpoint-dir ./runs/exp1 --epochs 10
#
# NP (default 2) workers on localhost, on free ports; every argument goes to the script
# (TRAIN_SCRIPT, default scripts/train.py). On a cluster, give each host a TF_CONFIG
# with the same "cluster" and its own "task" (slurm/train_mwms.sbatch does that), or:
#
#   FORGE_HOSTS="node1 node2" scripts/launch_mwms.sh --checkpoint-dir /shared/exp1
#
# one worker per host, started with `FORGE_AGENT HOST COMMAND` (default ssh) in this
# working directory, at MWMS_PORT (default 23456) on each; the command carries TF_CONFIG
# and this shell's FORGE_DIST_* variables (ssh passes no environment on).
# Exits with the first non-zero worker status; the other workers are then stopped.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
NP="${NP:-2}"
PYTHON="${PYTHON:-$(command -v python3)}"
[ -x "$here/../.venv/bin/python" ] && PYTHON="${PYTHON_OVERRIDE:-$here/../.venv/bin/python}"
TRAIN_SCRIPT="${TRAIN_SCRIPT:-$here/train.py}"
export TF_USE_LEGACY_KERAS="${TF_USE_LEGACY_KERAS-1}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

ports="$("$PYTHON" - "$NP" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(",".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
)"
workers="$(echo "$ports" | tr ',' '\n' | sed 's/^/"localhost:/; s/$/"/' | paste -sd, -)"
hosts=()
if [ -n "${FORGE_HOSTS:-}" ]; then
    read -r -a hosts <<< "$FORGE_HOSTS"
    NP="${#hosts[@]}"
    port="${MWMS_PORT:-23456}"
    workers="$(printf '"%s:'"$port"'",' "${hosts[@]}")"
    workers="${workers%,}"
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
for ((i = 0; i < NP; i++)); do
    tf_config="{\"cluster\": {\"worker\": [$workers]}, \"task\": {\"type\": \"worker\", \"index\": $i}}"
    if [ ${#hosts[@]} -gt 0 ]; then
        # What ssh would lose: the working directory and the environment, in the command.
        vars=("TF_CONFIG=$tf_config" "TF_USE_LEGACY_KERAS=$TF_USE_LEGACY_KERAS" "OMP_NUM_THREADS=$OMP_NUM_THREADS")
        while IFS= read -r name; do vars+=("$name=${!name}"); done < <(compgen -e | grep '^FORGE_DIST_' || true)
        ${FORGE_AGENT:-ssh} "${hosts[i]}" "cd $(printf %q "$PWD") && exec env $(printf '%q ' "${vars[@]}")$(printf '%q ' "$PYTHON" "$TRAIN_SCRIPT" --backend tf "$@")" &
    else
        TF_CONFIG="$tf_config" "$PYTHON" "$TRAIN_SCRIPT" --backend tf "$@" &
    fi
    pids+=("$!")
done
status=0
remaining=("${pids[@]}")
while [ ${#remaining[@]} -gt 0 ]; do
    if wait -n "${remaining[@]}"; then rc=0; else rc=$?; fi
    still=()
    for p in "${remaining[@]}"; do kill -0 "$p" 2>/dev/null && still+=("$p"); done
    remaining=("${still[@]}")
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=$rc
        echo "launch_mwms: a worker exited with $rc; stopping the others" >&2
        cleanup
    fi
done
exit "$status"
