# Sourced by slurm/train_*.sbatch (not run on its own): finds the Python, and runs the
# launcher so that a preemption warning reaches every rank and a preempted job requeues.
#
# Settings (environment, with defaults):
#   FORGE_CHECKPOINT_DIR  checkpoint root, any fsspec URL  (default: ./forge-runs/slurm-<backend>)
#   FORGE_LOCAL_DIR       node-local first tier: each checkpoint commits there, then is
#                         copied to FORGE_CHECKPOINT_DIR in the background (default: none)
#   FORGE_EPOCHS          epochs                           (default: 20)
#   FORGE_PYTHON          the Python with forge_dist       (default: .venv/bin/python, else python3)
#   FORGE_TRAIN_ARGS      more arguments for scripts/train.py          (default: none)
#   FORGE_REQUEUE         0: do not requeue after a preemption warning (default: 1)
#   FORGE_DIST_PREEMPT_NOTICE_S  seconds of --signal=B:USR1@N    (default: 120)
# Every run resumes from the newest checkpoint that verifies (--resume), mid-epoch
# included, so a requeued job goes on where it stopped.
#
# Preemption: submit with `#SBATCH --signal=B:USR1@120` (SLURM signals this batch shell
# 120 s before the time limit; `scancel --batch --signal=USR1 JOB` does the same by hand).
# The shell passes SIGUSR1 on to the launcher, which passes it to the ranks; forge_dist
# saves once and every rank exits with 75. SIGTERM (scancel, the time limit) is passed on
# as SIGUSR1 too, so the ranks save, but only a USR1 warning requeues the job
# (`scontrol requeue`, unless FORGE_REQUEUE=0); the requeued job resumes (--resume).
# shellcheck shell=bash

PREEMPTED_EXIT_CODE=75 # forge_dist.preemption.PREEMPTED_EXIT_CODE

PY="${FORGE_PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
MPIRUN="$(dirname "$PY")/mpirun"
[ -x "$MPIRUN" ] || MPIRUN=mpirun
if [ "$(id -u)" -eq 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
export PYTHONUNBUFFERED=1
# The notice SLURM gives before the kill: the N of `#SBATCH --signal=B:USR1@N` (120 in
# these scripts; change both together). The chief warns in this job's output when
# noticing the signal plus a save at the p95 measured does not fit in it.
export FORGE_DIST_PREEMPT_NOTICE_S="${FORGE_DIST_PREEMPT_NOTICE_S:-120}"
echo "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NTASKS:-?} tasks" \
    "on ${SLURM_JOB_NODELIST:-?}"

_forge_child=""
_forge_warned=0
_forge_forward() { # $1: the signal this shell got
    [ "$1" = USR1 ] && _forge_warned=1
    echo "job ${SLURM_JOB_ID:-?}: SIG$1: asking every rank to save and stop" >&2
    [ -n "$_forge_child" ] && kill -USR1 "$_forge_child" 2>/dev/null
    return 0
}

# forge_launch CMD...: run the launcher (mpirun or srun) and exit with its status;
# requeue the job when the ranks were preempted by a USR1 warning.
forge_launch() {
    "$@" &
    _forge_child=$!
    trap '_forge_forward USR1' USR1
    trap '_forge_forward TERM' TERM
    local rc
    while :; do
        rc=0
        wait "$_forge_child" || rc=$?
        # A trapped signal interrupts `wait` (status > 128) while the launcher runs on.
        kill -0 "$_forge_child" 2>/dev/null || break
    done
    trap - USR1 TERM
    if [ "$rc" -eq "$PREEMPTED_EXIT_CODE" ]; then
        echo "job ${SLURM_JOB_ID:-?}: preempted; the checkpoint is committed" >&2
        if [ "$_forge_warned" = 1 ] && [ "${FORGE_REQUEUE:-1}" != 0 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
            echo "job $SLURM_JOB_ID: requeueing" >&2
            scontrol requeue "$SLURM_JOB_ID" # ends this script
        fi
    fi
    exit "$rc"
}

# forge_train BACKEND LAUNCHER...: scripts/train.py with the FORGE_* settings, started by
# LAUNCHER on every task.
forge_train() {
    local backend="$1"
    shift
    # shellcheck disable=SC2086  # FORGE_TRAIN_ARGS is a list of arguments
    forge_launch "$@" "$PY" scripts/train.py --backend "$backend" \
        --checkpoint-dir "${FORGE_CHECKPOINT_DIR:-./forge-runs/slurm-$backend}" \
        ${FORGE_LOCAL_DIR:+--local-dir "$FORGE_LOCAL_DIR"} \
        --epochs "${FORGE_EPOCHS:-20}" --resume ${FORGE_TRAIN_ARGS:-}
}
