#!/usr/bin/env bash
# Launch scripts/train.py under horovodrun with Gloo. Copy it to your cluster and adapt.
#
#   NP=4 HOSTS=node1:2,node2:2 scripts/launch_horovod.sh --checkpoint-dir s3://bucket/exp1
#
# NP (default 2) processes on HOSTS (default localhost:NP); every other argument goes to
# train.py. FORGE_DIST_TIMEOUT (seconds) bounds every collective, Horovod's included.
# Gloo, not --mpi: horovodrun --mpi passes flags Open MPI 5's launcher misreads.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
NP="${NP:-2}"
HOSTS="${HOSTS:-localhost:$NP}"
PYTHON="${PYTHON:-$(command -v python3)}"
[ -x "$here/../.venv/bin/python" ] && PYTHON="${PYTHON_OVERRIDE:-$here/../.venv/bin/python}"
HOROVODRUN="$(dirname "$PYTHON")/horovodrun"
[ -x "$HOROVODRUN" ] || HOROVODRUN=horovodrun
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$HOROVODRUN" -np "$NP" -H "$HOSTS" --gloo "$PYTHON" "$here/train.py" --backend horovod "$@"
