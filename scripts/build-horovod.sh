#!/usr/bin/env bash
# Install Horovod 0.28.1 (TensorFlow + Gloo + MPI, CPU) into the virtual environment.
#
#   scripts/build-horovod.sh            # uses .venv; VENV=... to choose another
#
# Why a build of our own: `pip install horovod` fails on TensorFlow >= 2.16, because
# horovod/tensorflow/xla_mpi_ops.cc includes tensorflow/compiler/xla headers that TF no
# longer ships there. That file's code is only compiled for GPU builds (#if HAVE_GPU), so
# this script drops it from horovod/tensorflow/CMakeLists.txt and builds the PyPI sdist.
# This is the one workaround, in one place; the Dockerfile runs this same script.
#
# The built wheel is cached in ${FORGE_DIST_CACHE:-~/.cache/forge-dist}/horovod, keyed by
# the Horovod version, the installed TensorFlow version, the Python tag and this script:
# a second run installs in seconds, a changed TensorFlow rebuilds (about 3 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."

HOROVOD_VERSION=0.28.1
HOROVOD_SDIST_SHA256=92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
BIN="$(cd "$VENV/bin" && pwd)"

die() { echo "build-horovod: $*" >&2; exit 1; }
[ -x "$PY" ] || die "no virtual environment at $VENV (run scripts/setup-env.sh first)"

TF_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("tensorflow"))' 2>/dev/null)" \
    || die "TensorFlow is not installed in $VENV (the [tf] extra)"
PYTAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
SCRIPT_KEY="$(sha256sum "$0" | cut -c1-12)"
KEY="horovod-${HOROVOD_VERSION}-tf${TF_VERSION}-${PYTAG}-${SCRIPT_KEY}"
CACHE="${FORGE_DIST_CACHE:-$HOME/.cache/forge-dist}/horovod"
MARKER="$VENV/.forge-dist-horovod"

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$KEY" ] && "$PY" -c 'import horovod' 2>/dev/null; then
    exit 0
fi

# Building needs Open MPI's compiler wrappers (from the [mpi] extra's wheel) first on PATH.
export PATH="$BIN:$PATH"
command -v mpicxx >/dev/null || die "mpicxx not found: install the [mpi] extra (Open MPI wheel)"
command -v cmake >/dev/null || die "cmake not found (apt-get install cmake)"

cached_wheel() {
    local w
    for w in "$CACHE/$KEY"/horovod-*.whl; do
        [ -f "$w" ] && { echo "$w"; return 0; }
    done
    return 0
}

mkdir -p "$CACHE"
WHEEL="$(cached_wheel)"
if [ -z "$WHEEL" ]; then
    echo "build-horovod: building $KEY (a few minutes)" >&2
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$WORK"
    SDIST="$WORK/horovod-$HOROVOD_VERSION.tar.gz"
    [ -f "$SDIST" ] || die "pip did not download $SDIST"
    echo "$HOROVOD_SDIST_SHA256  $SDIST" | sha256sum -c --quiet - \
        || die "the horovod $HOROVOD_VERSION sdist changed (sha256 mismatch): check the workaround"
    tar -xzf "$SDIST" -C "$WORK"
    SRC="$WORK/horovod-$HOROVOD_VERSION"
    CMAKE="$SRC/horovod/tensorflow/CMakeLists.txt"
    # shellcheck disable=SC2016  # the literal CMake line, ${...} included
    LINE='list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")'
    [ "$(grep -cxF "$LINE" "$CMAKE")" = 1 ] \
        || die "$CMAKE no longer lists xla_mpi_ops.cc exactly once: the workaround needs review"
    grep -q '#if HAVE_GPU' "$SRC/horovod/tensorflow/xla_mpi_ops.cc" \
        || die "xla_mpi_ops.cc is no longer GPU-only: dropping it is not safe any more"
    grep -vxF "$LINE" "$CMAKE" > "$CMAKE.new" && mv "$CMAKE.new" "$CMAKE"
    HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
    HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_GPU_OPERATIONS='' \
    MAKEFLAGS="-j$(nproc)" \
        "$PY" -m pip wheel --quiet --no-build-isolation --no-deps -w "$WORK/dist" "$SRC"
    mkdir -p "$CACHE/$KEY"
    cp "$WORK"/dist/horovod-*.whl "$CACHE/$KEY/"
    WHEEL="$(cached_wheel)"
fi

"$PY" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$WHEEL"
"$PY" -m pip install --quiet --disable-pip-version-check cloudpickle psutil pyyaml packaging
"$BIN/horovodrun" --check-build > "$VENV/.horovod-check-build.txt"
for need in TensorFlow MPI Gloo; do
    grep -Eq "\[X\] $need" "$VENV/.horovod-check-build.txt" \
        || die "horovod was built without $need: $(cat "$VENV/.horovod-check-build.txt")"
done
echo "$KEY" > "$MARKER"
echo "build-horovod: installed $(basename "$WHEEL")" >&2
