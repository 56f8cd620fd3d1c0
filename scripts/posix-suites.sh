#!/usr/bin/env bash
# Run other projects' POSIX test suites against Chalk mounts:
#
#   pjdfstest 0.2.2  the POSIX conformance suite, on a writable mount
#   fsx 0.3.2        random reads, writes, mmap, truncates and copies with
#                    every read checked, on a writable mount
#   fio --verify     crc32c-checked random writes with the psync and mmap
#                    engines on a writable mount, then the same data checked
#                    again through a read-only mount of the synced version
#
# pjdfstest and fsx are not run on the read-only mount: both create and
# change files, so there they would only count EROFS errors.
#
# The suites are installed with `cargo install --locked` into
# $CHALK_TOOL_CACHE (default ~/.cache/chalk-tools) when absent, so each
# machine builds them once; fio comes from Debian (scripts/setup.sh).
# Run as root: pjdfstest switches users, which needs root and allow_other.
#
# Output: one "<suite>: N passed, N failed" line per suite and a last line
# "posix-suites: N passed, N failed, N skipped". Exit status 1 when any
# suite failed or could not run.
#
# Environment:
#   CHALK_BIN         chalk binary (default $CARGO_TARGET_DIR/release/chalk, else target/release/chalk)
#   CHALK_TOOL_CACHE  where the suites are installed
#   FSX_OPS           fsx operations per run (default 20000)
#   FSX_RUNS          fsx runs, each with its own seed on a new mount (default 1;
#                     scripts/soak.sh sets 50, for 1,000,000 operations in all)
#   FSX_SEED          seed of the first fsx run; run i uses FSX_SEED + i - 1
#                     (default: a new one, printed so a failure reproduces)
#
# NOTE: a session's segment log keeps every byte written until the session
# ends, so one long fsx run fills the disk (a 1,000,000-operation run had
# written 42 GB when it was stopped). fsx therefore runs in pieces of
# FSX_OPS operations, each on a mount that is unmounted afterwards.
#
# The run directory is /var/tmp/chalk-posix.XXXXXX with mode 0755, whatever
# TMPDIR is set to. pjdfstest's unprivileged users must be able to reach the
# mount point, and the engine needs a disk file system (not tmpfs) because
# it opens segments with O_DIRECT.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG_DIR="$REPO_ROOT/scripts/posix"

CHALK_BIN=${CHALK_BIN:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/chalk}
CHALK_TOOL_CACHE=${CHALK_TOOL_CACHE:-$HOME/.cache/chalk-tools}
FSX_OPS=${FSX_OPS:-20000}
FSX_RUNS=${FSX_RUNS:-1}
FSX_SEED=${FSX_SEED:-$(( (RANDOM << 15) | RANDOM ))}

PJDFSTEST_VERSION=0.2.2
FSX_VERSION=0.3.2
# fio job size per engine: large enough to cross many 1 MiB write chunks.
FIO_SIZE=64m
# Seconds before a hung suite is killed. fsx gets 1 s per 200 operations
# (about 8 times what 20,000 operations took on a busy 2-core machine), and
# at least 10 minutes.
SUITE_TIMEOUT_SECONDS=600
FSX_TIMEOUT_SECONDS=$((FSX_OPS / 200 > SUITE_TIMEOUT_SECONDS ? FSX_OPS / 200 : SUITE_TIMEOUT_SECONDS))

PASSED=0
FAILED=0
SKIPPED=0
MOUNTS=()

log() {
    echo "posix-suites: $*"
}

# Records one suite's result and prints its line.
report() {
    local suite=$1 passed=$2 failed=$3 skipped=${4:-0}
    PASSED=$((PASSED + passed))
    FAILED=$((FAILED + failed))
    SKIPPED=$((SKIPPED + skipped))
    echo "$suite: $passed passed, $failed failed, $skipped skipped"
}

# Unmounts every mount this script made, newest first, on every exit path.
cleanup() {
    local status=$?
    trap - EXIT
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        local dir=${MOUNTS[i]}
        if mountpoint -q "$dir"; then
            "$CHALK_BIN" volume unmount "$dir" >/dev/null 2>&1 || fusermount3 -u "$dir" 2>/dev/null ||
                umount -l "$dir" || echo "posix-suites: failed to unmount $dir" >&2
        fi
    done
    if [[ -n "${RUN_DIR:-}" ]]; then
        cd /
        rm -rf --one-file-system "$RUN_DIR" || echo "posix-suites: failed to remove $RUN_DIR" >&2
    fi
    exit "$status"
}

# Prints the path of a suite's binary, installing it first when absent.
ensure_tool() {
    local crate=$1 version=$2
    local root="$CHALK_TOOL_CACHE/$crate-$version"
    local binary="$root/bin/$crate"
    if [[ ! -x "$binary" ]]; then
        log "installing $crate $version into $root" >&2
        cargo install --locked --quiet --root "$root" "$crate" --version "$version" >&2
    fi
    echo "$binary"
}

# Mounts the volume on $RUN_DIR/NAME with any extra mount options. Callers
# must not run it in a subshell, so that MOUNTS lists every mount for the
# cleanup trap.
mount_volume() {
    local name=$1
    shift
    local dir="$RUN_DIR/$name"
    mkdir -p "$dir"
    MOUNTS+=("$dir")
    "$CHALK_BIN" volume mount posix "$dir" --daemon "$@" >/dev/null
}

run_pjdfstest() {
    local pjdfstest=$1 mount=$2
    local log_file="$RUN_DIR/pjdfstest.log"
    mkdir "$mount/pjdfstest"
    # A directory on another file system, for the EXDEV tests of rename and link.
    mkdir "$RUN_DIR/secondary"
    log "pjdfstest $PJDFSTEST_VERSION on the writable mount"
    local status=0
    (cd "$mount/pjdfstest" && timeout "$SUITE_TIMEOUT_SECONDS" "$pjdfstest" -c "$CONFIG_DIR/pjdfstest.toml" -p "$mount/pjdfstest" -s "$RUN_DIR/secondary") \
        >"$log_file" 2>&1 || status=$?
    # Every skip is listed, so a new one shows up in the CI log.
    grep -E '[[:space:]]skipped$' "$log_file" | awk '{ print "pjdfstest skipped: " $1 }' || true

    # The suite's last summary line: "Summary: 0 failed, 14 skipped, 384 passed, ...".
    local summary
    summary=$(grep -E '^Summary: ' "$log_file" | tail -n 1 || true)
    if [[ -z "$summary" ]]; then
        tail -n 20 "$log_file"
        log "pjdfstest printed no summary (exit $status)"
        report "pjdfstest" 0 1
        return
    fi
    local passed failed skipped
    passed=$(grep -oE '[0-9]+ passed' <<<"$summary" | grep -oE '[0-9]+')
    failed=$(grep -oE '[0-9]+ failed' <<<"$summary" | grep -oE '[0-9]+')
    skipped=$(grep -oE '[0-9]+ skipped' <<<"$summary" | grep -oE '[0-9]+')
    if ((failed > 0)); then
        grep -E 'FAILED|failed' "$log_file" | grep -v '^Summary' | head -n 40 || true
    elif ((status != 0)); then
        # No failed test, but the suite itself failed: count that once.
        tail -n 20 "$log_file"
        failed=1
    fi
    report "pjdfstest" "$passed" "$failed" "$skipped"
}

# Runs fsx FSX_RUNS times, each on a new writable mount that is unmounted
# afterwards, so its session's log is deleted before the next run.
run_fsx() {
    local fsx=$1
    local artifacts="$RUN_DIR/fsx-artifacts"
    mkdir -p "$artifacts"
    log "fsx $FSX_VERSION, $FSX_RUNS run(s) of $FSX_OPS operations from seed $FSX_SEED, each on a new writable mount"
    local start=$SECONDS run passed=0 failed=0
    for ((run = 1; run <= FSX_RUNS; run++)); do
        local seed=$((FSX_SEED + run - 1)) mount="$RUN_DIR/fsx-$run"
        mount_volume "fsx-$run"
        if timeout "$FSX_TIMEOUT_SECONDS" "$fsx" -q -N "$FSX_OPS" -S "$seed" -f "$CONFIG_DIR/fsx.toml" -P "$artifacts" \
            "$mount/fsx.bin" >"$RUN_DIR/fsx.log" 2>&1; then
            passed=$((passed + 1))
        else
            tail -n 40 "$RUN_DIR/fsx.log"
            log "fsx failed with seed $seed; rerun with FSX_SEED=$seed FSX_OPS=$FSX_OPS"
            failed=$((failed + 1))
        fi
        "$CHALK_BIN" volume unmount "$mount" >/dev/null
    done
    log "fsx ran $((passed * FSX_OPS)) operations clean in $((SECONDS - start)) s"
    report "fsx ($FSX_RUNS run(s) of $FSX_OPS operations)" "$passed" "$failed"
}

# The fio options of one job. Every 4 KiB block fio writes carries a
# header with its offset and a crc32c of the block, which a later read
# with --verify checks, whatever engine or mount it reads through.
fio_job() {
    local engine=$1 file=$2 rw=$3
    echo --name="$engine" --filename="$file" --ioengine="$engine" --rw="$rw" --bs=4k --size="$FIO_SIZE" \
        --verify=crc32c --verify_fatal=1 --verify_state_save=0
}

# Writes and verifies with fio on the writable mount, one job per engine.
run_fio_write() {
    local mount=$1
    mkdir "$mount/fio"
    local engine passed=0 failed=0
    for engine in psync mmap; do
        # shellcheck disable=SC2046 # fio_job prints separate words on purpose.
        if timeout "$SUITE_TIMEOUT_SECONDS" fio --output="$RUN_DIR/fio-$engine.log" $(fio_job "$engine" "$mount/fio/$engine.dat" randwrite) --do_verify=1; then
            passed=$((passed + 1))
        else
            tail -n 30 "$RUN_DIR/fio-$engine.log"
            failed=$((failed + 1))
        fi
    done
    report "fio --verify=crc32c, psync and mmap (writable mount)" "$passed" "$failed"
}

# Verifies the files fio wrote through a read-only mount of the synced version.
run_fio_verify_read_only() {
    local mount=$1
    local engine passed=0 failed=0
    for engine in psync mmap; do
        # A sequential read of the whole file checks every block's header
        # and crc32c. --readonly makes fio refuse any write.
        # shellcheck disable=SC2046 # fio_job prints separate words on purpose.
        if timeout "$SUITE_TIMEOUT_SECONDS" fio --output="$RUN_DIR/fio-$engine-ro.log" $(fio_job "$engine" "$mount/fio/$engine.dat" read) --readonly; then
            passed=$((passed + 1))
        else
            tail -n 30 "$RUN_DIR/fio-$engine-ro.log"
            failed=$((failed + 1))
        fi
    done
    report "fio --verify=crc32c reads, psync and mmap (read-only version mount)" "$passed" "$failed"
}

main() {
    if ((EUID != 0)); then
        echo "posix-suites: run as root: pjdfstest switches users and needs allow_other" >&2
        exit 1
    fi
    [[ -x "$CHALK_BIN" ]] || { echo "posix-suites: $CHALK_BIN not found; build with cargo build --release" >&2; exit 1; }
    command -v fio >/dev/null || { echo "posix-suites: fio not found; run scripts/setup.sh" >&2; exit 1; }

    local pjdfstest fsx
    pjdfstest=$(ensure_tool pjdfstest "$PJDFSTEST_VERSION")
    fsx=$(ensure_tool fsx "$FSX_VERSION")

    RUN_DIR=$(realpath "$(mktemp -d /var/tmp/chalk-posix.XXXXXX)")
    chmod 0755 "$RUN_DIR"
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    # Tools that leave files in the working directory leave them in the run directory.
    cd "$RUN_DIR"
    export CHALK_HOME="$RUN_DIR/home"
    unset CHALK_STORE CHALK_LOG
    "$CHALK_BIN" volume create posix >/dev/null

    local writable="$RUN_DIR/rw"
    mount_volume rw
    run_pjdfstest "$pjdfstest" "$writable"
    run_fsx "$fsx"
    run_fio_write "$writable"

    local version read_only="$RUN_DIR/ro"
    version=$("$CHALK_BIN" volume sync "$writable" | awk '{ print $NF }')
    log "synced version $version"
    mount_volume ro --version "$version"
    run_fio_verify_read_only "$read_only"

    echo "posix-suites: $PASSED passed, $FAILED failed, $SKIPPED skipped"
    ((FAILED == 0))
}

main "$@"
