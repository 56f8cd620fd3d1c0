#!/usr/bin/env bash
# Prepare the Python environment of the SDK tests, then run a command in it.
#
#   bash scripts/python-env.sh                      # prepare only, print the venv path
#   bash scripts/python-env.sh python -m pytest ... # prepare, then run venv/bin/python
#
# The virtualenv lives in the per-machine tool cache and is created once.
# The test tools (maturin, pytest, pandas, pyarrow, fsspec, datasets) come from PyPI
# and are installed again only when the list below changes. Then the SDK is
# installed with `pip install ./python`, which builds the extension with
# maturin and cargo in the workspace's target directory (CARGO_TARGET_DIR
# when set), so it shares the build of scripts/setup.sh. That step is
# skipped when no source file of the SDK, the engine or the FUSE adaptor
# changed since the last install.
#
# Environment:
#   CHALK_TOOL_CACHE  per-machine cache (default ~/.cache/chalk-tools)
#   CHALK_PYTHON      interpreter that creates the venv (default python3, 3.11 or newer)
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

CHALK_TOOL_CACHE="${CHALK_TOOL_CACHE:-$HOME/.cache/chalk-tools}"
VENV="$CHALK_TOOL_CACHE/python-venv"
PYTHON="${CHALK_PYTHON:-python3}"
REQUIREMENTS=("pip>=23" "maturin>=1.5,<2" "pytest>=7" "pandas>=2" "pyarrow>=14" "fsspec>=2023.1.0" "datasets>=2.14")

log() {
    echo "python-env: $*" >&2
}

die() {
    echo "python-env: error: $*" >&2
    exit 1
}

ensure_cargo_on_path() {
    if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null || die "cargo not found; run scripts/setup.sh first"
}

create_venv() {
    if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        return
    fi
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install python3 (3.11 or newer) or set CHALK_PYTHON"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is $("$PYTHON" --version 2>&1); the SDK needs Python 3.11 or newer (set CHALK_PYTHON)"
    log "creating the virtualenv $VENV with $("$PYTHON" --version 2>&1)"
    rm -rf "$VENV"
    mkdir -p "$CHALK_TOOL_CACHE"
    # Debian's python3 needs the python3-venv package for this (scripts/setup.sh installs it).
    "$PYTHON" -m venv "$VENV"
}

install_tools() {
    local stamp="$VENV/.chalk-requirements"
    local wanted
    wanted=$(printf '%s\n' "${REQUIREMENTS[@]}")
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
        return
    fi
    log "installing from PyPI: ${REQUIREMENTS[*]}"
    "$VENV/bin/python" -m pip install --quiet --upgrade "${REQUIREMENTS[@]}"
    echo "$wanted" >"$stamp"
}

# Print a hash of everything the SDK is built from.
source_hash() {
    find python engine fused -type f \( -name '*.rs' -o -name '*.py' -o -name '*.pyi' -o -name '*.toml' -o -name 'py.typed' \) \
        -not -path 'python/tests/*' -not -path '*/__pycache__/*' -print0 |
        sort -z | xargs -0 sha256sum | cat - Cargo.toml Cargo.lock | sha256sum | cut -d' ' -f1
}

install_sdk() {
    local stamp="$VENV/.chalkcompute-source"
    local hash
    hash="$(source_hash) $REPO_ROOT"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$hash" ]] && "$VENV/bin/python" -c 'import chalkcompute._native' 2>/dev/null; then
        log "chalkcompute is up to date"
        return
    fi
    ensure_cargo_on_path
    local start=$SECONDS
    log "pip install ./python (maturin, cargo target directory ${CARGO_TARGET_DIR:-$REPO_ROOT/target})"
    # No build isolation: maturin is already in the venv, and an isolated
    # build would download it again on every run. The build backend runs
    # the maturin program, so the venv's bin directory goes on PATH.
    PATH="$VENV/bin:$PATH" "$VENV/bin/python" -m pip install --quiet --no-build-isolation --force-reinstall --no-deps ./python
    echo "$hash" >"$stamp"
    log "chalkcompute installed in $((SECONDS - start)) s"
}

main() {
    mkdir -p "$CHALK_TOOL_CACHE"
    # One install at a time: several work trees of one machine share the venv.
    exec 9>"$CHALK_TOOL_CACHE/python-venv.lock"
    flock 9
    create_venv
    install_tools
    install_sdk
    flock -u 9
    if (($# == 0)); then
        echo "$VENV"
        return
    fi
    local program=$1
    shift
    exec "$VENV/bin/$program" "$@"
}

main "$@"
