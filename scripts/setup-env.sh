#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv), idempotently.
#
#   scripts/setup-env.sh [EXTRAS]      e.g. scripts/setup-env.sh dev,s3,tf,mpi
#
# Installs missing Debian packages through apt-get (as root, or with sudo), creates
# .venv, and (re)installs forge_dist with the given extras only when pyproject.toml,
# this script or the extras changed since the last run: a second run takes well
# under a second. With the dev extra it also installs Azurite (npm) under .venv/azurite,
# the local Azure Blob endpoint of the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS="${1:-dev,s3,tf,mpi}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

apt_install() {
    # apt_install PKG... : install the Debian packages that are missing.
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if ! command -v apt-get >/dev/null; then
        echo "setup-env: need Debian packages ${missing[*]} but apt-get is not available" >&2
        return 1
    fi
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup-env: installing Debian packages: ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# A Python that can make virtual environments (Debian splits venv out of python3).
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv
fi

AZURITE_VERSION=3.37.0
install_azurite() {
    # The tests' Azure Blob emulator, from npm, pinned, inside the venv's folder.
    local dir="$VENV/azurite"
    [ -x "$dir/node_modules/.bin/azurite-blob" ] \
        && grep -q "\"$AZURITE_VERSION\"" "$dir/node_modules/azurite/package.json" 2>/dev/null \
        && return 0
    if ! command -v npm >/dev/null; then
        apt_install nodejs npm
    fi
    echo "setup-env: installing azurite $AZURITE_VERSION with npm" >&2
    mkdir -p "$dir"
    npm install --prefix "$dir" --no-audit --no-fund --loglevel=error \
        "azurite@$AZURITE_VERSION" >/dev/null
}

stamp_key() {
    { echo "$EXTRAS"; cat pyproject.toml "$0"; "$PYTHON" -VV; } | sha256sum | cut -c1-16
}
KEY="$(stamp_key)"
STAMP="$VENV/.forge-dist-setup"

case ",$EXTRAS," in *,dev,*) install_azurite ;; esac

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ]; then
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[${EXTRAS}]"
echo "$KEY" > "$STAMP"
echo "setup-env: $VENV ready with extras [$EXTRAS]" >&2
