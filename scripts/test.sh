#!/usr/bin/env bash
# Run the whole Chalk test suite: machine set-up and release build, the
# workspace tests under nextest, the doc tests, the end-to-end demo in
# quick mode, the Python SDK's pytest suite (in the virtualenv that
# scripts/python-env.sh prepares), other projects' POSIX suites against a mount
# (scripts/posix-suites.sh) and a short run of each fuzz target
# (fuzz/run.sh). Every stage runs even when an earlier test stage failed.
# The last line is "total: N passed, N failed, N skipped", and the exit
# status is non-zero when any stage failed.
#
# Temporary files of the tests and the demo live in one run directory under
# /var/tmp (not tmpfs, because the engine opens files with O_DIRECT). On exit,
# whatever is still mounted there is unmounted and the directory is removed.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

export CHALK_TOOL_CACHE="${CHALK_TOOL_CACHE:-$HOME/.cache/chalk-tools}"
# Unset the caller's store settings so that the tests and the demo cannot
# touch a real store.
unset CHALK_HOME CHALK_STORE

# Resolve symlinks so the paths match the mount points in /proc/self/mountinfo.
RUN_DIR=$(realpath "$(mktemp -d /var/tmp/chalk-test.XXXXXX)")
mkdir -p "$RUN_DIR/tmp"
# State of the S3 test servers of this run, stopped and removed on exit.
export CHALK_S3_DIR="$RUN_DIR/s3-servers"
# tempfile, mktemp and the demo create their directories under TMPDIR, which
# puts every mount of this run under RUN_DIR where the exit trap finds it.
export TMPDIR="$RUN_DIR/tmp"

TOTAL_PASSED=0
TOTAL_FAILED=0
TOTAL_SKIPPED=0
STAGE_RESULTS=()
FAILED_STAGES=()

# Print the mount points under $1, deepest first, from this mount namespace.
mounts_under() {
    awk -v root="$1/" 'index($5, root) == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

unmount_leftovers() {
    local mount_point
    while IFS= read -r mount_point; do
        [[ -n "$mount_point" ]] || continue
        echo "test.sh: unmounting leftover mount $mount_point"
        fusermount3 -u "$mount_point" 2>/dev/null || umount -l "$mount_point" ||
            echo "test.sh: failed to unmount $mount_point" >&2
    done < <(mounts_under "$RUN_DIR")
}

cleanup() {
    local status=$?
    trap - EXIT
    unmount_leftovers
    bash scripts/s3-servers.sh stop || echo "test.sh: failed to stop the S3 test servers" >&2
    # --one-file-system keeps rm out of any mount that refused to go away.
    rm -rf --one-file-system "$RUN_DIR" || echo "test.sh: failed to remove $RUN_DIR" >&2
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Print the sum of the numbers that stand before the word $1 in the lines on stdin.
sum_counts() {
    local word=$1
    # grep finds nothing when the word is absent, which is a count of 0, not an error.
    { grep -oE "[0-9]+ $word" || true; } | awk '{ sum += $1 } END { print sum + 0 }'
}

# Print "passed failed skipped" counted from a stage's log.
count_results() {
    local stage=$1
    local log=$2
    local plain
    plain=$(sed -E 's/\x1b\[[0-9;]*m//g' "$log")

    case "$stage" in
        nextest)
            # nextest's closing line: "Summary [ 1.2s] 9 tests run: 8 passed, 1 failed, 2 skipped".
            local summary
            summary=$(grep -E 'Summary \[.*\] [0-9]+ tests? run:' <<<"$plain" | tail -n 1 || true)
            local failed timed_out
            failed=$(sum_counts failed <<<"$summary")
            timed_out=$(sum_counts 'timed out' <<<"$summary")
            echo "$(sum_counts passed <<<"$summary") $((failed + timed_out)) $(sum_counts skipped <<<"$summary")"
            ;;
        doctests)
            # libtest prints one "test result: ok. 3 passed; 0 failed; 1 ignored; ..." per crate.
            local results
            results=$(grep -E '^test result:' <<<"$plain" || true)
            echo "$(sum_counts passed <<<"$results") $(sum_counts failed <<<"$results") $(sum_counts ignored <<<"$results")"
            ;;
        posix | fuzz)
            # Each script's last line: "posix-suites: 389 passed, 0 failed, 14 skipped"
            # or "fuzz: 3 passed, 0 failed".
            local summary
            summary=$(grep -E '^(posix-suites|fuzz): [0-9]+ passed' <<<"$plain" | tail -n 1 || true)
            echo "$(sum_counts passed <<<"$summary") $(sum_counts failed <<<"$summary") $(sum_counts skipped <<<"$summary")"
            ;;
        pytest)
            # pytest's closing line: "==== 30 passed, 1 failed, 2 skipped, 1 error in 12.3s ====".
            local summary failed errors
            summary=$(grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected)[^=]* in [0-9.]+s' <<<"$plain" | tail -n 1 || true)
            failed=$(sum_counts failed <<<"$summary")
            errors=$(sum_counts error <<<"$summary")
            echo "$(sum_counts passed <<<"$summary") $((failed + errors)) $(sum_counts skipped <<<"$summary")"
            ;;
        demo)
            local passed failed
            passed=$(grep -cE '^ok   ' <<<"$plain" || true)
            failed=$(grep -cE '^FAIL ' <<<"$plain" || true)
            echo "$passed $failed 0"
            ;;
        *)
            echo "0 0 0"
            ;;
    esac
}

# Run one stage, show its output, and add its counts to the totals. A stage
# that exits non-zero without a counted failure (a build error, say) counts as
# one failure.
run_stage() {
    local stage=$1
    shift
    local log="$RUN_DIR/$stage.log"
    local start=$SECONDS
    echo "test.sh: == $stage: $*"

    local status
    set +e
    "$@" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    set -e

    local passed failed skipped
    read -r passed failed skipped < <(count_results "$stage" "$log")
    if ((status != 0 && failed == 0)); then
        failed=1
    fi
    TOTAL_PASSED=$((TOTAL_PASSED + passed))
    TOTAL_FAILED=$((TOTAL_FAILED + failed))
    TOTAL_SKIPPED=$((TOTAL_SKIPPED + skipped))

    local verdict=ok
    if ((status != 0)); then
        verdict="FAILED (exit $status)"
        FAILED_STAGES+=("$stage")
    fi
    STAGE_RESULTS+=("$stage $verdict in $((SECONDS - start)) s")
    echo "test.sh: == $stage $verdict in $((SECONDS - start)) s"
    return "$status"
}

print_summary() {
    local line
    for line in "${STAGE_RESULTS[@]}"; do
        echo "test.sh: $line"
    done
    if ((${#FAILED_STAGES[@]} > 0)); then
        echo "test.sh: failed stages: ${FAILED_STAGES[*]}"
    else
        echo "test.sh: all stages passed"
    fi
    echo "total: $TOTAL_PASSED passed, $TOTAL_FAILED failed, $TOTAL_SKIPPED skipped"
}

main() {
    local start=$SECONDS

    # Without a build nothing else can run, so a set-up failure ends the run.
    if ! run_stage setup bash scripts/setup.sh; then
        print_summary
        exit 1
    fi

    # The S3 tests run against Garage and moto on 127.0.0.1 (Garage is built
    # into CHALK_TOOL_CACHE the first time, which takes about 14 minutes).
    # CHALK_TEST_S3=required makes them fail, never skip, without servers.
    export CHALK_TEST_S3=required AWS_EC2_METADATA_DISABLED=true
    if run_stage s3-servers bash scripts/s3-servers.sh start; then
        eval "$(bash scripts/s3-servers.sh env)"
    fi

    # The dashboard's browser test fails, never skips, without Chromium.
    export CHALK_TEST_BROWSER=required
    run_stage nextest cargo nextest run --workspace --release --no-fail-fast --profile ci || true
    run_stage doctests cargo test --doc --workspace --release || true
    run_stage demo env CHALK_SKIP_SETUP=1 bash scripts/demo.sh --quick || true
    run_stage pytest bash scripts/python-env.sh python -m pytest -p no:cacheprovider python/tests || true
    run_stage posix bash scripts/posix-suites.sh || true
    run_stage fuzz bash fuzz/run.sh 20 || true

    echo "test.sh: finished in $((SECONDS - start)) s"
    print_summary
    if ((${#FAILED_STAGES[@]} > 0)); then
        exit 1
    fi
}

main "$@"
