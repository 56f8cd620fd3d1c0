#!/usr/bin/env bash
# Prepare a Debian 12 machine (as root) to build and test Chalk, then build the
# release binaries. Safe to run many times: a second run installs nothing and
# only lets cargo confirm that the build is up to date.
#
# Environment:
#   CHALK_TOOL_CACHE  per-machine cache for test tools (default ~/.cache/chalk-tools)
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

# Debian packages the build, the tests and the demo need. A package is
# installed only when dpkg reports it missing. chromium and chromium-driver
# run the dashboard's browser test (tests/tests/dashboard_browser.rs).
# python3-venv lets scripts/python-env.sh create the SDK tests' virtualenv;
# the SDK's sandboxes run in bubblewrap and build their Debian image with
# debootstrap.
APT_PACKAGES=(fuse3 fio bindfs rclone git tar coreutils python3 chromium chromium-driver python3-venv bubblewrap debootstrap)

log() {
    echo "setup: $*"
}

die() {
    echo "setup: error: $*" >&2
    exit 1
}

is_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

install_apt_packages() {
    local missing=()
    local package
    for package in "$@"; do
        is_installed "$package" || missing+=("$package")
    done

    if ((${#missing[@]} == 0)); then
        log "apt packages already installed: $*"
        return
    fi

    log "installing with apt-get: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for the dpkg lock instead of failing when another apt run holds it.
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}"
}

# Let non-root FUSE mounts pass allow_other, which tests that switch uid need.
configure_fuse() {
    command -v fusermount3 >/dev/null || die "fusermount3 not found after installing fuse3"

    if [[ -f /etc/fuse.conf ]] && grep -Eq '^[[:space:]]*user_allow_other[[:space:]]*$' /etc/fuse.conf; then
        log "/etc/fuse.conf already allows user_allow_other"
    else
        echo "user_allow_other" >>/etc/fuse.conf
        log "added user_allow_other to /etc/fuse.conf"
    fi

    if [[ ! -c /dev/fuse ]]; then
        log "warning: /dev/fuse is missing, so mounts will fail (try: modprobe fuse)"
    fi
}

ensure_cargo() {
    if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null || die "cargo not found. Install the Rust toolchain with rustup, then rerun this script"
    log "$(cargo --version)"
}

ensure_nextest() {
    if cargo nextest --version >/dev/null 2>&1; then
        log "$(cargo nextest --version | head -n 1) already installed"
        return
    fi
    log "installing cargo-nextest with cargo install"
    cargo install cargo-nextest --locked
    log "$(cargo nextest --version | head -n 1) installed"
}

# Later scripts cache heavy test tools here (for example an S3 server and
# POSIX test suites built with cargo install), so each machine builds them
# once. The directory outlives the work tree and any CI clone.
prepare_tool_cache() {
    export CHALK_TOOL_CACHE="${CHALK_TOOL_CACHE:-$HOME/.cache/chalk-tools}"
    mkdir -p "$CHALK_TOOL_CACHE"
    log "tool cache: $CHALK_TOOL_CACHE"
}

build_release() {
    local args=(build --release --workspace)
    if [[ -f Cargo.lock ]]; then
        args+=(--locked)
    fi

    local start=$SECONDS
    log "cargo ${args[*]}"
    cargo "${args[@]}"
    log "release build done in $((SECONDS - start)) s"
}

main() {
    install_apt_packages "${APT_PACKAGES[@]}"
    configure_fuse
    ensure_cargo
    ensure_nextest
    prepare_tool_cache
    build_release
}

main "$@"
