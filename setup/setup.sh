#!/usr/bin/env bash
# Prepare this machine for CDL (`make setup`): system packages, then four Python environments,
#   .venv                      the platform and its training stack (the `cdl` command)
#   .cdl/venvs/label-studio    the Label Studio server
#   .cdl/venvs/serving         the seldon-core microservice (pins old protobuf/numpy)
#   .cdl/venvs/determined      Determined's client and trial entrypoint (pins requests<2.32)
# Idempotent: each environment carries a stamp of what it was built from and is rebuilt only when
# that changes, so a second run takes about a second.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENVS=.cdl/venvs
TORCH_VERSION=2.13.0

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
fail() { printf '\033[1;31msetup failed:\033[0m %s\n' "$*" >&2; exit 1; }

# pip, minus the per-package notes this machine's extra local indexes print.
pip_quiet() {
    local pip=$1 status; shift
    set +e
    "$pip" install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither"
    status=${PIPESTATUS[0]}
    set -e
    return "$status"
}

# --- system packages ------------------------------------------------------------------------
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing+=(postgresql)
command -v runuser >/dev/null || missing+=(util-linux)
command -v rsync >/dev/null || missing+=(rsync)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
ls /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz >/dev/null 2>&1 || missing+=(dataset-fashion-mnist)
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)

if ((${#missing[@]})); then
    say "installing system packages: ${missing[*]}"
    if [ "$(id -u)" -eq 0 ]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo); else
        fail "missing ${missing[*]}; install them as root (apt-get install ${missing[*]})"
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq || fail "apt-get update failed"
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || fail "apt-get install ${missing[*]} failed"
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || fail "CDL needs Python 3.11 or newer; set PYTHON=/path/to/python3.11"

# --- Python environments --------------------------------------------------------------------
# A stamp: what an environment is built from (files, the torch pin, the Python version).
stamp_of() {
    { cat "$@"; echo "torch $TORCH_VERSION"; } | "$PYTHON" -c \
        'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read() + sys.version.encode()).hexdigest())'
}
# needs_build DIR STAMP: true unless DIR was built from STAMP; creates DIR if it is missing.
# A changed stamp installs over the existing environment, so only what changed is downloaded.
needs_build() {
    local dir=$1 stamp=$2
    [ "$(cat "$dir/.cdl-stamp" 2>/dev/null)" = "$stamp" ] && [ -x "$dir/bin/python" ] && return 1
    if ! "$dir/bin/python" -c '' 2>/dev/null; then
        rm -rf "$dir"
        "$PYTHON" -m venv "$dir" || fail "cannot create a venv in $dir"
    fi
    rm -f "$dir/.cdl-stamp"
    return 0
}

stamp=$(stamp_of pyproject.toml setup/platform-constraints.txt)
if needs_build .venv "$stamp"; then
    say "platform environment (.venv): torch $TORCH_VERSION (CPU wheel first), then the training stack"
    # torch first, pinned: with it present, lightning's "torch" requirement pulls nothing more.
    pip_quiet .venv/bin/pip "torch==$TORCH_VERSION" || fail "pip install torch==$TORCH_VERSION failed"
    pip_quiet .venv/bin/pip -c setup/platform-constraints.txt -e ".[platform]" \
        || fail "pip install of the platform environment failed"
    echo "$stamp" > .venv/.cdl-stamp
fi

stamp=$(stamp_of setup/label-studio-constraints.txt)
if needs_build "$VENVS/label-studio" "$stamp"; then
    say "Label Studio environment ($VENVS/label-studio)"
    pip_quiet "$VENVS/label-studio/bin/pip" -c setup/label-studio-constraints.txt "label-studio==1.23.2" \
        || fail "pip install label-studio failed"
    echo "$stamp" > "$VENVS/label-studio/.cdl-stamp"
fi

stamp=$(stamp_of setup/serving-constraints.txt)
if needs_build "$VENVS/serving" "$stamp"; then
    say "serving environment ($VENVS/serving): seldon-core 1.18.2"
    # gunicorn under seldon-core 1.18 imports pkg_resources, which setuptools 82 removed.
    pip_quiet "$VENVS/serving/bin/pip" -c setup/serving-constraints.txt "setuptools<82" \
        "seldon-core==1.18.2" || fail "pip install seldon-core failed"
    echo "$stamp" > "$VENVS/serving/.cdl-stamp"
fi

stamp=$(stamp_of setup/determined-constraints.txt)
if needs_build "$VENVS/determined" "$stamp"; then
    say "Determined environment ($VENVS/determined): determined 0.38.1, torch $TORCH_VERSION, lightning"
    # The platform package is not installed here: the bridge and the trial entrypoint import it
    # from the checkout (PYTHONPATH) or from an experiment's context directory (its cwd).
    pip_quiet "$VENVS/determined/bin/pip" "torch==$TORCH_VERSION" \
        || fail "pip install torch==$TORCH_VERSION (Determined environment) failed"
    pip_quiet "$VENVS/determined/bin/pip" -c setup/determined-constraints.txt "determined==0.38.1" \
        lightning nltk mlflow-skinny pandas || fail "pip install determined failed"
    echo "$stamp" > "$VENVS/determined/.cdl-stamp"
fi

say "ready: .venv/bin/cdl, $VENVS/label-studio, $VENVS/serving, $VENVS/determined"
