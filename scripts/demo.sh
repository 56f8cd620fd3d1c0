#!/usr/bin/env bash
# Run the main Chalk job end to end on real input, on the embedded object
# store (a local directory). The demo puts a ~30 MB binary and a Python
# standard library tree into a volume and reads them back through the CLI and
# through a FUSE mount. Then it runs git and tar inside the mount, syncs, and
# checks that the previous version stays unchanged and read-only.
#
# Usage: scripts/demo.sh [--quick]
#   --quick  copy only the json, email, asyncio and unittest packages of the
#            standard library (a few hundred files at most) instead of all of it
#
# Environment:
#   CHALK_SKIP_SETUP=1  do not run scripts/setup.sh first
#   CHALK_HOME          use this store instead of a temporary one; the demo
#                       then creates and deletes the volume "demo" in it, and
#                       CHALK_STORE is used as set
#
# Each check prints "ok   <check>" or "FAIL <check>: <detail>". The first
# failure ends the run with exit status 1.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

VOLUME=demo
# The full run is meant to exercise many small files.
MIN_FULL_TREE_FILES=5000
QUICK_PACKAGES=(json email asyncio unittest)

QUICK=0
usage() {
    echo "usage: $0 [--quick]" >&2
}
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "demo: unknown argument: $arg" >&2
            usage
            exit 2
            ;;
    esac
done

# English tool messages, so the read-only check can match strerror(EROFS).
export LC_ALL=C
# Keep the user's git configuration (hooks, signing) out of the git checks.
export GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1

CHECKS_PASSED=0

ok() {
    CHECKS_PASSED=$((CHECKS_PASSED + 1))
    echo "ok   $1"
}

fail() {
    echo "FAIL $1: $2"
    exit 1
}

# Run a command as a check. On failure, show the end of its output.
check() {
    local name=$1
    shift
    local output status=0
    output=$("$@" 2>&1) || status=$?
    if ((status != 0)); then
        printf '%s\n' "$output" | tail -n 20 | sed 's/^/    /'
        fail "$name" "exit status $status from: $*"
    fi
    ok "$name"
}

now_ms() {
    date +%s%3N
}

STEP_NAME=""
STEP_START=0
RUN_START=$(now_ms)

begin_step() {
    STEP_NAME=$1
    STEP_START=$(now_ms)
    echo "-- step $STEP_NAME"
}

end_step() {
    local elapsed=$(($(now_ms) - STEP_START))
    printf -- '-- step %s done in %d.%03d s\n' "$STEP_NAME" $((elapsed / 1000)) $((elapsed % 1000))
}

if [[ "${CHALK_SKIP_SETUP:-0}" != 1 ]]; then
    bash scripts/setup.sh
fi

CHALK="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/chalk"
if [[ ! -x "$CHALK" ]]; then
    fail "chalk binary" "$CHALK not found. Run scripts/setup.sh to build it"
fi

# The work directory must not be on tmpfs, because the engine uses O_DIRECT.
WORK_BASE=${TMPDIR:-/var/tmp}
if [[ ! -d "$WORK_BASE" || $(stat -f -c %T "$WORK_BASE") == tmpfs ]]; then
    WORK_BASE=/var/tmp
fi
# Resolve symlinks so the paths match the mount points in /proc/self/mountinfo.
WORK=$(realpath "$(mktemp -d "$WORK_BASE/chalk-demo.XXXXXX")")
mkdir -p "$WORK/tmp" "$WORK/staging"

OWN_HOME=0
if [[ -z "${CHALK_HOME:-}" ]]; then
    OWN_HOME=1
    export CHALK_HOME="$WORK/home"
    # The default object store is file://$CHALK_HOME/objects.
    unset CHALK_STORE
fi
echo "demo: CHALK_HOME=$CHALK_HOME, work directory $WORK"

MOUNTS=()
VOLUME_CREATED=0

is_mounted() {
    awk -v dir="$1" '$5 == dir { found = 1 } END { exit !found }' /proc/self/mountinfo
}

unmount_all() {
    local dir
    for dir in "${MOUNTS[@]}"; do
        if is_mounted "$dir"; then
            echo "demo: unmounting $dir"
            fusermount3 -u "$dir" 2>/dev/null || umount -l "$dir" || echo "demo: failed to unmount $dir" >&2
        fi
    done
}

cleanup() {
    local status=$?
    trap - EXIT
    unmount_all
    # A volume left in the caller's store would make the next run's create fail.
    if ((OWN_HOME == 0 && VOLUME_CREATED == 1)); then
        "$CHALK" volume delete "$VOLUME" >/dev/null 2>&1 || echo "demo: failed to delete volume $VOLUME from $CHALK_HOME" >&2
    fi
    # --one-file-system keeps rm out of any mount that refused to go away.
    rm -rf --one-file-system "$WORK" || echo "demo: failed to remove $WORK" >&2
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Mount the volume at $2 with extra chalk arguments, then check that $2 is a
# mount point once chalk returns.
mount_volume() {
    local name=$1
    local dir=$2
    shift 2
    mkdir -p "$dir"
    MOUNTS+=("$dir")
    check "$name" "$CHALK" volume mount "$VOLUME" "$dir" "$@" --daemon
    is_mounted "$dir" || fail "$name" "chalk returned but $dir is not a mount point"
}

unmount_volume() {
    local name=$1
    local dir=$2
    check "$name" "$CHALK" volume unmount "$dir"
    if is_mounted "$dir"; then
        fail "$name" "$dir is still mounted after chalk volume unmount"
    fi
}

# Print "sha256  path" for every regular file under $1, sorted by path.
hash_tree() {
    (cd "$1" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum)
}

# Compare the checksums of every staged file with the same files under the
# mount point $2 (stdlib tree and model file).
check_hashes() {
    local name=$1
    local mount_point=$2
    local actual="$WORK/tmp/actual.sha256"
    {
        hash_tree "$mount_point/src/stdlib" | sed 's|  \./|  src/stdlib/|'
        (cd "$mount_point" && sha256sum models/latest.bin)
    } | sort -k 2 >"$actual" || fail "$name" "reading files under $mount_point failed"
    if ! diff -u "$EXPECTED_HASHES" "$actual" >"$WORK/tmp/hash.diff"; then
        head -n 20 "$WORK/tmp/hash.diff" | sed 's/^/    /'
        fail "$name" "sha256 sums differ from the originals ($(grep -c '^[-+][0-9a-f]' "$WORK/tmp/hash.diff") lines differ)"
    fi
    ok "$name ($(wc -l <"$actual") files)"
}

# Print the field $1 ("id" or "seq") of every version, oldest first.
version_field() {
    "$CHALK" volume versions "$VOLUME" --json |
        python3 -c 'import json, sys; print("\n".join(str(v[sys.argv[1]]) for v in json.load(sys.stdin)))' "$1"
}

step_create() {
    begin_step "a: create volume"
    check "chalk volume create $VOLUME" "$CHALK" volume create "$VOLUME"
    VOLUME_CREATED=1
    end_step
}

# Set MODEL_FILE to the real libicudata file (not its symlink), installing
# libicu72 if needed.
resolve_model_file() {
    if [[ $(dpkg-query -W -f='${db:Status-Status}' libicu72 2>/dev/null) != installed ]]; then
        echo "demo: installing libicu72 with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends libicu72
    fi
    local listed
    listed=$(dpkg -L libicu72 | grep 'libicudata\.so' | head -n 1 || true)
    [[ -n "$listed" ]] || fail "model file" "dpkg -L libicu72 lists no libicudata.so"
    MODEL_FILE=$(readlink -f "$listed")

    local size
    size=$(stat -c %s "$MODEL_FILE")
    ((size >= 1024 * 1024)) || fail "model file" "$MODEL_FILE has only $size bytes"
    ok "model file: $MODEL_FILE ($size bytes)"
}

# Copy the standard library of the machine's python3 into $STAGE, without
# installed packages and byte code, so the input does not change between runs.
# The full run adds the C headers under /usr/include (libc6-dev, linux-libc-dev
# and friends) as usr-include/, because the stdlib alone has fewer than
# $MIN_FULL_TREE_FILES files on these machines.
stage_source_tree() {
    local stdlib
    stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    [[ -d "$stdlib" ]] || fail "source tree" "python3 reports stdlib $stdlib, which is not a directory"

    local members=(.)
    if ((QUICK)); then
        members=("${QUICK_PACKAGES[@]}")
    fi
    mkdir -p "$STAGE"
    tar -C "$stdlib" --exclude=site-packages --exclude=__pycache__ -cf - "${members[@]}" |
        tar -C "$STAGE" -xf - || fail "source tree" "copying $stdlib to $STAGE failed"

    if ((!QUICK)); then
        [[ -d /usr/include ]] || fail "source tree" "/usr/include is missing; install libc6-dev"
        mkdir -p "$STAGE/usr-include"
        tar -C /usr/include -cf - . | tar -C "$STAGE/usr-include" -xf - ||
            fail "source tree" "copying /usr/include to $STAGE/usr-include failed"
    fi

    STAGED_FILES=$(find "$STAGE" -type f | wc -l)
    if ((QUICK)); then
        ((STAGED_FILES > 0)) || fail "source tree" "no files copied from $stdlib"
        ok "source tree: $STAGED_FILES files from ${QUICK_PACKAGES[*]} in $stdlib"
    elif ((STAGED_FILES < MIN_FULL_TREE_FILES)); then
        fail "source tree" "$stdlib and /usr/include have $STAGED_FILES files, fewer than the $MIN_FULL_TREE_FILES this demo requires"
    else
        ok "source tree: $STAGED_FILES files from $stdlib and /usr/include"
    fi
}

step_put() {
    begin_step "b: put real data"
    resolve_model_file
    check "chalk volume put $VOLUME (model file) models/latest.bin" \
        "$CHALK" volume put "$VOLUME" "$MODEL_FILE" models/latest.bin

    STAGE="$WORK/staging/stdlib"
    stage_source_tree
    check "chalk volume put $VOLUME (stdlib) src/stdlib" \
        "$CHALK" volume put "$VOLUME" "$STAGE" src/stdlib

    EXPECTED_HASHES="$WORK/tmp/expected.sha256"
    {
        hash_tree "$STAGE" | sed 's|  \./|  src/stdlib/|'
        echo "$(sha256sum <"$MODEL_FILE" | cut -d ' ' -f 1)  models/latest.bin"
    } | sort -k 2 >"$EXPECTED_HASHES"
    end_step
}

step_list() {
    begin_step "c: list"
    local listing
    listing=$("$CHALK" volume ls "$VOLUME" 2>&1) || fail "chalk volume ls $VOLUME" "$listing"
    grep -q models <<<"$listing" || fail "chalk volume ls $VOLUME" "no models entry in: $listing"
    grep -q src <<<"$listing" || fail "chalk volume ls $VOLUME" "no src entry in: $listing"
    ok "chalk volume ls $VOLUME lists models and src"

    "$CHALK" volume ls "$VOLUME" src/stdlib --json >"$WORK/tmp/ls.json" ||
        fail "chalk volume ls $VOLUME src/stdlib --json" "exit status $?"
    check "chalk volume ls $VOLUME src/stdlib --json is valid JSON" python3 -m json.tool "$WORK/tmp/ls.json"
    end_step
}

step_get() {
    begin_step "d: get"
    local copy="$WORK/tmp/got.bin"
    check "chalk volume get $VOLUME models/latest.bin" "$CHALK" volume get "$VOLUME" models/latest.bin "$copy"
    check "downloaded model file equals the original" cmp "$MODEL_FILE" "$copy"
    end_step
}

# Run git in $1 with a fixed author, so the commit does not depend on the
# machine. Automatic maintenance is off: after a commit of 10,000 files git
# starts a background repack in the mount, which keeps it busy at unmount.
demo_git() {
    git -C "$1" -c user.email=demo@example.invalid -c user.name=demo \
        -c maintenance.auto=false -c gc.auto=0 "${@:2}"
}

step_mount_and_write() {
    begin_step "e: mount writable and work in it"
    MNT="$WORK/mnt"
    mount_volume "chalk volume mount $VOLUME (writable)" "$MNT"
    check_hashes "sha256 of files in the mount match the originals" "$MNT"

    local repo="$MNT/src/stdlib"
    check "git init in the mount" demo_git "$repo" init -q
    check "git add -A in the mount" demo_git "$repo" add -A
    check "git commit in the mount" demo_git "$repo" commit -qm demo
    check "git fsck in the mount" demo_git "$repo" fsck --no-progress
    local commits
    commits=$(demo_git "$repo" log --oneline | wc -l)
    ((commits == 1)) || fail "git log in the mount" "expected 1 commit, found $commits"
    ok "git log in the mount shows 1 commit"

    check "tar of src/stdlib from the mount" tar -C "$MNT/src" -cf "$WORK/tmp/t.tar" stdlib
    mkdir "$MNT/roundtrip" || fail "mkdir roundtrip in the mount" "mkdir $MNT/roundtrip failed"
    check "tar extract into the mount" tar -C "$MNT/roundtrip" -xf "$WORK/tmp/t.tar"
    check "extracted tree equals the staged tree" diff -r --exclude=.git "$STAGE" "$MNT/roundtrip/stdlib"
    end_step
}

step_sync() {
    begin_step "f: sync and list versions"
    local output
    output=$("$CHALK" volume sync "$MNT" 2>&1) || fail "chalk volume sync $MNT" "$output"
    echo "    $output"
    ok "chalk volume sync $MNT"

    check "chalk volume versions $VOLUME" "$CHALK" volume versions "$VOLUME"
    "$CHALK" volume versions "$VOLUME" --json >"$WORK/tmp/versions.json" ||
        fail "chalk volume versions $VOLUME --json" "exit status $?"
    check "chalk volume versions $VOLUME --json is valid JSON" python3 -m json.tool "$WORK/tmp/versions.json"

    local ids seqs
    mapfile -t ids < <(version_field id)
    mapfile -t seqs < <(version_field seq)
    # create, put of the model file, put of the stdlib, and this sync
    ((${#ids[@]} == 4)) || fail "4 versions" "found ${#ids[@]}: ${ids[*]}"
    ok "4 versions (create, 2 puts, sync)"
    local sorted
    sorted=$(printf '%s\n' "${seqs[@]}" | sort -n)
    [[ "$sorted" == "$(printf '%s\n' "${seqs[@]}")" ]] || fail "versions oldest first" "seq order is ${seqs[*]}"
    ok "versions are listed oldest first (seq ${seqs[*]})"
    grep -qF "${ids[3]}" <<<"$output" || fail "sync prints the new version id" "${ids[3]} not in: $output"
    ok "sync printed the new version id ${ids[3]}"
    PREVIOUS_ID=${ids[2]}
    end_step
}

step_previous_version() {
    begin_step "g: mount the previous version read-only"
    unmount_volume "chalk volume unmount $MNT" "$MNT"

    local mnt2="$WORK/mnt2"
    mount_volume "chalk volume mount $VOLUME --version $PREVIOUS_ID" "$mnt2" --version "$PREVIOUS_ID"
    [[ ! -e "$mnt2/roundtrip" ]] || fail "previous version has no roundtrip/" "$mnt2/roundtrip exists"
    ok "previous version has no roundtrip/"
    [[ ! -e "$mnt2/src/stdlib/.git" ]] || fail "previous version has no src/stdlib/.git" "$mnt2/src/stdlib/.git exists"
    ok "previous version has no src/stdlib/.git"

    local touch_error
    if touch_error=$(touch "$mnt2/x" 2>&1); then
        fail "touch in a --version mount fails" "touch $mnt2/x succeeded"
    fi
    grep -q 'Read-only file system' <<<"$touch_error" ||
        fail "touch in a --version mount fails with EROFS" "$touch_error"
    ok "touch in a --version mount fails with EROFS"

    check_hashes "sha256 of files in the previous version match the originals" "$mnt2"
    unmount_volume "chalk volume unmount $mnt2" "$mnt2"
    end_step
}

step_latest_version() {
    begin_step "h: mount the latest version read-only, then delete"
    local mnt3="$WORK/mnt3"
    mount_volume "chalk volume mount $VOLUME --read-only" "$mnt3" --read-only
    [[ -d "$mnt3/roundtrip" ]] || fail "latest version has roundtrip/" "$mnt3/roundtrip is missing"
    ok "latest version has roundtrip/"
    unmount_volume "chalk volume unmount $mnt3" "$mnt3"

    check "chalk volume delete $VOLUME" "$CHALK" volume delete "$VOLUME"
    VOLUME_CREATED=0
    if "$CHALK" volume ls "$VOLUME" >/dev/null 2>&1; then
        fail "deleted volume is gone" "chalk volume ls $VOLUME still succeeds"
    fi
    ok "deleted volume is gone"
    end_step
}

main() {
    step_create
    step_put
    step_list
    step_get
    step_mount_and_write
    step_sync
    step_previous_version
    step_latest_version

    local elapsed=$(($(now_ms) - RUN_START))
    printf 'demo: all %d checks passed in %d.%03d s\n' "$CHECKS_PASSED" $((elapsed / 1000)) $((elapsed % 1000))
}

main
