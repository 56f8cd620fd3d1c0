#!/usr/bin/env bash
# Run every cargo-fuzz target in fuzz/ for SECONDS each (default 20).
#
# Usage: fuzz/run.sh [SECONDS] [TARGET...]
#
# cargo-fuzz builds with sanitizer flags that only a nightly compiler
# accepts. The machines have a stable toolchain only, so the build sets
# RUSTC_BOOTSTRAP=1, which lets stable rustc accept them (checked with
# rustc 1.95.0 and cargo-fuzz 0.13.2).
#
# cargo-fuzz is installed into $CHALK_TOOL_CACHE/cargo-fuzz when absent.
# The build directory and the corpus live in $CHALK_TOOL_CACHE/fuzz too,
# so CI rebuilds only what changed and each run starts from the inputs
# that earlier runs found. A crash leaves its input in fuzz/artifacts/TARGET/.
#
# Output: one "TARGET: N runs in N s" line per target and a last line
# "fuzz: N passed, N failed" (one pass per target that ran clean). Exit
# status 1 when a target crashed or could not be built.
set -euo pipefail

FUZZ_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHALK_TOOL_CACHE=${CHALK_TOOL_CACHE:-$HOME/.cache/chalk-tools}
CARGO_FUZZ_VERSION=0.13.2
SECONDS_PER_TARGET=${1:-20}
shift || true
TARGETS=("$@")
if ((${#TARGETS[@]} == 0)); then
    TARGETS=(record_decoder checkpoint_decoder normalize_path)
fi

log() {
    echo "fuzz: $*"
}

ensure_cargo_fuzz() {
    local root="$CHALK_TOOL_CACHE/cargo-fuzz"
    if [[ ! -x "$root/bin/cargo-fuzz" ]] || ! "$root/bin/cargo-fuzz" --version | grep -q "$CARGO_FUZZ_VERSION"; then
        log "installing cargo-fuzz $CARGO_FUZZ_VERSION into $root"
        cargo install --locked --quiet --root "$root" cargo-fuzz --version "$CARGO_FUZZ_VERSION"
    fi
    export PATH="$root/bin:$PATH"
}

main() {
    ensure_cargo_fuzz
    export RUSTC_BOOTSTRAP=1
    local target_dir="$CHALK_TOOL_CACHE/fuzz/target"
    cd "$FUZZ_DIR"

    local start=$SECONDS
    if ! cargo fuzz build -O --target-dir "$target_dir"; then
        log "building the fuzz targets failed"
        echo "fuzz: 0 passed, 1 failed"
        exit 1
    fi
    log "built the targets in $((SECONDS - start)) s"

    local passed=0 failed=0 target
    for target in "${TARGETS[@]}"; do
        local corpus="$CHALK_TOOL_CACHE/fuzz/corpus/$target"
        local log_file
        log_file=$(mktemp "${TMPDIR:-/tmp}/chalk-fuzz-$target.XXXXXX")
        mkdir -p "$corpus"
        if cargo fuzz run -O --target-dir "$target_dir" "$target" "$corpus" -- \
            -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 >"$log_file" 2>&1; then
            local runs
            runs=$(grep -oE 'Done [0-9]+ runs' "$log_file" | grep -oE '[0-9]+' || echo "?")
            echo "$target: $runs runs in $SECONDS_PER_TARGET s, no crash"
            passed=$((passed + 1))
        else
            tail -n 40 "$log_file"
            echo "$target: crashed; the input is in $FUZZ_DIR/artifacts/$target/"
            failed=$((failed + 1))
        fi
        rm -f "$log_file"
    done
    echo "fuzz: $passed passed, $failed failed"
    ((failed == 0))
}

main
