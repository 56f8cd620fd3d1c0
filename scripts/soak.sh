#!/usr/bin/env bash
# Long reliability runs, for before a release and for docs/reliability.md.
# CI runs the short forms of the same tests through scripts/test.sh.
#
# Usage: scripts/soak.sh [PART...]   with PART one of posix, kills, faults,
# fuzz (default: all four, in that order).
#
#   posix   scripts/posix-suites.sh with 50 fsx runs of 20,000 operations
#           (SOAK_FSX_RUNS), 1,000,000 operations in all
#   kills   the kill-and-recover test with 3,000 kills (SOAK_KILLS)
#   faults  the fault-injection tests with 200 seeds (SOAK_FAULT_SEEDS), and
#           the local write faults with 100 seeds (SOAK_LOCAL_FAULT_SEEDS)
#   fuzz    every fuzz target for 1,800 s (SOAK_FUZZ_SECONDS)
#
# Each part prints its own figures; the last line is "soak: N passed,
# N failed", one count per part. Exit status 1 when any part failed. Logs
# are kept in a directory under /var/tmp whose path is printed at the end.
# Run as root on an otherwise idle machine: pjdfstest and the full-disk
# test need root, and timing-dependent kills aim better without load.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
export CHALK_TOOL_CACHE="${CHALK_TOOL_CACHE:-$HOME/.cache/chalk-tools}"
unset CHALK_HOME CHALK_STORE

SOAK_FSX_RUNS=${SOAK_FSX_RUNS:-50}
SOAK_KILLS=${SOAK_KILLS:-3000}
SOAK_FAULT_SEEDS=${SOAK_FAULT_SEEDS:-200}
SOAK_LOCAL_FAULT_SEEDS=${SOAK_LOCAL_FAULT_SEEDS:-100}
SOAK_FUZZ_SECONDS=${SOAK_FUZZ_SECONDS:-1800}

LOG_DIR=$(mktemp -d /var/tmp/chalk-soak.XXXXXX)
PASSED=0
FAILED=0

# Runs one part with its output shown and kept in $LOG_DIR/PART.log.
run_part() {
    local part=$1
    shift
    local start=$SECONDS status=0
    echo "soak: == $part: $*"
    set +e
    "$@" 2>&1 | tee "$LOG_DIR/$part.log"
    status=${PIPESTATUS[0]}
    set -e
    if ((status == 0)); then
        PASSED=$((PASSED + 1))
        echo "soak: == $part ok in $((SECONDS - start)) s"
    else
        FAILED=$((FAILED + 1))
        echo "soak: == $part FAILED (exit $status) in $((SECONDS - start)) s"
    fi
}

run() {
    case "$1" in
        posix)
            cargo build --release --locked -p chalk-tools
            run_part posix env FSX_RUNS="$SOAK_FSX_RUNS" FSX_OPS=20000 bash scripts/posix-suites.sh
            ;;
        kills)
            run_part kills env CHALK_KILLS="$SOAK_KILLS" \
                cargo test --release --locked -p chalk-tests --test kill_recover -- --nocapture
            ;;
        faults)
            run_part faults env CHALK_FAULT_SEEDS="$SOAK_FAULT_SEEDS" \
                cargo test --release --locked -p chalk-engine --test faults -- --nocapture
            run_part local-faults env CHALK_LOCAL_FAULT_SEEDS="$SOAK_LOCAL_FAULT_SEEDS" \
                cargo test --release --locked -p chalk-engine --test local_faults -- --nocapture
            ;;
        fuzz)
            run_part fuzz bash fuzz/run.sh "$SOAK_FUZZ_SECONDS"
            ;;
        *)
            echo "soak: unknown part $1; use posix, kills, faults or fuzz" >&2
            exit 2
            ;;
    esac
}

main() {
    local parts=("$@")
    if ((${#parts[@]} == 0)); then
        parts=(posix kills faults fuzz)
    fi
    local part
    for part in "${parts[@]}"; do
        run "$part"
    done

    # The figures docs/reliability.md records.
    echo "soak: figures"
    grep -hE '^(pjdfstest|fsx|fio)[^:]*: [0-9]+ passed|^kill-recover:|^network faults:|^corrupt payloads:|^local faults,|^[a-z_]+: [0-9?]+ runs in' \
        "$LOG_DIR"/*.log 2>/dev/null | sed 's/^/soak:   /' || true
    echo "soak: logs in $LOG_DIR"
    echo "soak: $PASSED passed, $FAILED failed"
    ((FAILED == 0))
}

main "$@"
