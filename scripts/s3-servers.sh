#!/usr/bin/env bash
# Start and stop the S3 test servers on 127.0.0.1: Garage 2.5.0 (a real
# S3-compatible store, for the data path) and moto server 5.2.1 (for
# conditional writes, which Garage 2.5 accepts and ignores).
#
# Usage:
#   scripts/s3-servers.sh start    build missing tools, start both servers, wait until they answer
#   scripts/s3-servers.sh env      print `export` lines for the tests and the benchmark
#   scripts/s3-servers.sh status   say whether each server runs
#   scripts/s3-servers.sh stop     stop both servers and delete their data
#
# `start` is idempotent: a server that already runs is kept. Each server
# listens on a free port chosen at start and keeps its data under the state
# directory. Typical use outside CI:
#   scripts/s3-servers.sh start && eval "$(scripts/s3-servers.sh env)"
#
# Environment:
#   CHALK_TOOL_CACHE  per-machine tool cache (default ~/.cache/chalk-tools):
#                     Garage is built into garage/ (about 14 minutes the first
#                     time), moto is installed into a venv in moto/
#   CHALK_S3_DIR      state directory: configs, data, logs, pid files and the
#                     env file (default /var/tmp/chalk-s3-servers)
set -euo pipefail

GARAGE_VERSION=2.5.0
MOTO_VERSION=5.2.1
GARAGE_REGION=garage
MOTO_REGION=us-east-1
BUCKET=chalk-test
# Seconds a server gets to open its port.
READY_TIMEOUT_S=60

CHALK_TOOL_CACHE="${CHALK_TOOL_CACHE:-$HOME/.cache/chalk-tools}"
STATE_DIR="${CHALK_S3_DIR:-/var/tmp/chalk-s3-servers}"
GARAGE_ROOT="$CHALK_TOOL_CACHE/garage"
GARAGE_BIN="$GARAGE_ROOT/bin/garage"
MOTO_VENV="$CHALK_TOOL_CACHE/moto"
MOTO_BIN="$MOTO_VENV/bin/moto_server"
ENV_FILE="$STATE_DIR/env"

log() {
    echo "s3-servers: $*" >&2
}

die() {
    echo "s3-servers: error: $*" >&2
    exit 1
}

# Print a TCP port on 127.0.0.1 that is free right now.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Print the pid in $1 if that process is alive.
live_pid() {
    local pid_file=$1
    [[ -f "$pid_file" ]] || return 1
    local pid
    pid=$(<"$pid_file")
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

wait_for_port() {
    local name=$1 port=$2 pid=$3 log_file=$4
    local deadline=$((SECONDS + READY_TIMEOUT_S))
    until port_open "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$log_file" >&2 || true
            die "$name exited before it opened port $port; its log is $log_file"
        fi
        if ((SECONDS > deadline)); then
            tail -n 20 "$log_file" >&2 || true
            die "$name did not open port $port within $READY_TIMEOUT_S s; its log is $log_file"
        fi
        sleep 0.2
    done
}

ensure_garage() {
    if [[ -x "$GARAGE_BIN" ]] && "$GARAGE_BIN" --version 2>/dev/null | grep -q "cargo:$GARAGE_VERSION "; then
        return
    fi
    log "building garage $GARAGE_VERSION into $GARAGE_ROOT (about 14 minutes the first time)"
    cargo install garage --version "$GARAGE_VERSION" --locked --root "$GARAGE_ROOT" \
        --target-dir "$CHALK_TOOL_CACHE/garage-build" >&2
    rm -rf "$CHALK_TOOL_CACHE/garage-build"
    [[ -x "$GARAGE_BIN" ]] || die "cargo install finished but $GARAGE_BIN is missing"
}

ensure_moto() {
    if [[ -x "$MOTO_BIN" ]] && [[ $("$MOTO_VENV/bin/python" -c 'import moto; print(moto.__version__)' 2>/dev/null) == "$MOTO_VERSION" ]]; then
        return
    fi
    log "installing moto[server]==$MOTO_VERSION into $MOTO_VENV"
    rm -rf "$MOTO_VENV"
    if ! python3 -m venv "$MOTO_VENV" >&2; then
        # Debian keeps venv support in a separate package.
        if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
            log "installing python3-venv with apt-get"
            DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq python3-venv >&2
            rm -rf "$MOTO_VENV"
            python3 -m venv "$MOTO_VENV" >&2
        else
            die "python3 -m venv failed; install python3-venv"
        fi
    fi
    "$MOTO_VENV/bin/pip" install --quiet "moto[server]==$MOTO_VERSION" >&2
    [[ -x "$MOTO_BIN" ]] || die "pip finished but $MOTO_BIN is missing"
}

start_garage() {
    local dir="$STATE_DIR/garage"
    if live_pid "$dir/pid" >/dev/null && [[ -f "$dir/vars" ]]; then
        # shellcheck source=/dev/null
        source "$dir/vars"
        if port_open "$GARAGE_S3_PORT"; then
            log "garage already runs on port $GARAGE_S3_PORT"
            return
        fi
    fi
    stop_one garage
    rm -rf "$dir"
    mkdir -p "$dir/meta" "$dir/data"

    local s3_port rpc_port access_key secret_key rpc_secret
    s3_port=$(free_port)
    rpc_port=$(free_port)
    # Garage key ids are GK followed by 24 hex digits; secrets are 64 hex digits.
    access_key="GK$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')"
    secret_key=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
    rpc_secret=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
    cat >"$dir/garage.toml" <<EOF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$rpc_secret"

[s3_api]
s3_region = "$GARAGE_REGION"
api_bind_addr = "127.0.0.1:$s3_port"
root_domain = ".s3.garage.localhost"
EOF
    cat >"$dir/vars" <<EOF
GARAGE_S3_PORT=$s3_port
GARAGE_ACCESS_KEY=$access_key
GARAGE_SECRET_KEY=$secret_key
EOF

    log "starting garage on 127.0.0.1:$s3_port"
    GARAGE_DEFAULT_ACCESS_KEY="$access_key" GARAGE_DEFAULT_SECRET_KEY="$secret_key" \
        GARAGE_DEFAULT_BUCKET="$BUCKET" RUST_LOG="${GARAGE_LOG:-warn}" \
        setsid "$GARAGE_BIN" -c "$dir/garage.toml" server --single-node --default-bucket \
        </dev/null >"$dir/log" 2>&1 &
    echo $! >"$dir/pid"
    wait_for_port garage "$s3_port" "$!" "$dir/log"
}

start_moto() {
    local dir="$STATE_DIR/moto"
    if live_pid "$dir/pid" >/dev/null && [[ -f "$dir/vars" ]]; then
        # shellcheck source=/dev/null
        source "$dir/vars"
        if port_open "$MOTO_PORT"; then
            log "moto already runs on port $MOTO_PORT"
            return
        fi
    fi
    stop_one moto
    rm -rf "$dir"
    mkdir -p "$dir"

    local port
    port=$(free_port)
    echo "MOTO_PORT=$port" >"$dir/vars"
    log "starting moto on 127.0.0.1:$port"
    setsid "$MOTO_BIN" -H 127.0.0.1 -p "$port" </dev/null >"$dir/log" 2>&1 &
    echo $! >"$dir/pid"
    wait_for_port moto "$port" "$!" "$dir/log"
    # moto does not check signatures, so a plain request creates the bucket.
    curl --silent --show-error --fail --max-time 10 -X PUT "http://127.0.0.1:$port/$BUCKET" >/dev/null ||
        die "failed to create bucket $BUCKET on moto; its log is $dir/log"
}

# Stop the server named $1 if its pid file names a live process.
stop_one() {
    local name=$1
    local dir="$STATE_DIR/$name"
    local pid
    if pid=$(live_pid "$dir/pid"); then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 10))
        while kill -0 "$pid" 2>/dev/null; do
            if ((SECONDS > deadline)); then
                log "$name did not exit after SIGTERM; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
    fi
    rm -f "$dir/pid"
}

write_env() {
    # shellcheck source=/dev/null
    source "$STATE_DIR/garage/vars"
    # shellcheck source=/dev/null
    source "$STATE_DIR/moto/vars"
    cat >"$ENV_FILE" <<EOF
export CHALK_GARAGE_ENDPOINT=http://127.0.0.1:$GARAGE_S3_PORT
export CHALK_GARAGE_REGION=$GARAGE_REGION
export CHALK_GARAGE_BUCKET=$BUCKET
export CHALK_GARAGE_ACCESS_KEY_ID=$GARAGE_ACCESS_KEY
export CHALK_GARAGE_SECRET_ACCESS_KEY=$GARAGE_SECRET_KEY
export CHALK_MOTO_ENDPOINT=http://127.0.0.1:$MOTO_PORT
export CHALK_MOTO_REGION=$MOTO_REGION
export CHALK_MOTO_BUCKET=$BUCKET
export CHALK_MOTO_ACCESS_KEY_ID=testing
export CHALK_MOTO_SECRET_ACCESS_KEY=testing
EOF
}

main() {
    local command=${1:-}
    case "$command" in
        start)
            mkdir -p "$STATE_DIR" "$CHALK_TOOL_CACHE"
            ensure_garage
            ensure_moto
            start_garage
            start_moto
            write_env
            if [ -n "${CHALK_S3_DIR:-}" ]; then
                log "ready; load the settings with: eval \"\$(CHALK_S3_DIR=$STATE_DIR $0 env)\""
            else
                log "ready; load the settings with: eval \"\$($0 env)\""
            fi
            ;;
        env)
            [[ -f "$ENV_FILE" ]] || die "no servers were started under $STATE_DIR; run $0 start"
            cat "$ENV_FILE"
            ;;
        status)
            local name pid status=0
            for name in garage moto; do
                if pid=$(live_pid "$STATE_DIR/$name/pid"); then
                    echo "$name runs (pid $pid)"
                else
                    echo "$name is stopped"
                    status=1
                fi
            done
            return "$status"
            ;;
        stop)
            stop_one garage
            stop_one moto
            rm -rf "$STATE_DIR"
            ;;
        *)
            die "unknown command ${command:-(none)}; use start, env, status or stop"
            ;;
    esac
}

main "$@"
