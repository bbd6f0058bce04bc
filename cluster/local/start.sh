#!/usr/bin/env bash
# Starts a local multi-node Ray cluster on this one machine (a head + N worker nodes), to try the
# distributed path of the pipeline (Ray Data over several raylets, Ray Train workers on different
# nodes, `ray job submit`) without a real cluster. Stop it with cluster/local/stop.sh.
#
#   cluster/local/start.sh            # head + 2 worker nodes
#   ITR_RAY_WORKERS=3 cluster/local/start.sh
#
# Settings (environment variables, all optional; stop.sh must see the same ITR_RAY_TEMP_DIR):
#   ITR_RAY_WORKERS         worker nodes besides the head                      (2)
#   ITR_RAY_HEAD_CPUS       CPUs the head advertises                           (1)
#   ITR_RAY_WORKER_CPUS     CPUs each worker node advertises                   (1)
#   ITR_RAY_WORKER_GPUS     GPUs each worker node advertises; all nodes share  (0)
#                           this machine's GPUs, so keep it 0 or 1
#   ITR_RAY_OBJECT_STORE    object store bytes per node (else ~30% RAM each)   (1000000000)
#   ITR_RAY_PORT            GCS port of the head                               (26380)
#   ITR_RAY_DASHBOARD_PORT  dashboard / job API port, bound to 127.0.0.1       (28266)
#   ITR_RAY_CLIENT_PORT     Ray Client server port (kept out of 10002-19999)   (23001)
#   ITR_RAY_AGENT_PORT      first of 4 ports of node i's agents (i = 0 for the head):    (25365)
#                           AGENT_PORT + 4i + 0..3 = dashboard agent HTTP and gRPC, metrics export,
#                           runtime-env agent
#   ITR_RAY_TEMP_DIR        Ray's temp dir, logs and this script's state       (/tmp/itr-ray-<uid>)
#   ITR_RAY_BIN             the `ray` executable     (<repo>/.venv/bin/ray, else `ray` on PATH)
#   ITR_RAY_START_ATTEMPTS  tries per node that does not come up                        (3)
#   ITR_RAY_WAIT            seconds a late node gets to come up, and all of them to show
#                           in `ray status`                                             (120)
#   ITR_WORKDIR             workdir printed in the example commands            (<repo>/work/cluster)
#
# None of the ports is a Ray default (6379, 8265, 10001, 52365), so this cluster can run beside
# another Ray on the machine; the temp dir keeps a bare `ray.init()` from attaching to it.
# Token authentication stays on (RAY_AUTH_MODE=token): every client needs RAY_AUTH_MODE=token and
# reads the token from ~/.ray/auth_token (created here if missing).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

WORKERS="${ITR_RAY_WORKERS:-2}"
HEAD_CPUS="${ITR_RAY_HEAD_CPUS:-1}"
WORKER_CPUS="${ITR_RAY_WORKER_CPUS:-1}"
WORKER_GPUS="${ITR_RAY_WORKER_GPUS:-0}"
OBJECT_STORE="${ITR_RAY_OBJECT_STORE:-1000000000}"
PORT="${ITR_RAY_PORT:-26380}"
DASH="${ITR_RAY_DASHBOARD_PORT:-28266}"
CLIENT_PORT="${ITR_RAY_CLIENT_PORT:-23001}"
AGENT_PORT="${ITR_RAY_AGENT_PORT:-25365}"
TEMP_DIR="${ITR_RAY_TEMP_DIR:-/tmp/itr-ray-$(id -u)}"
START_ATTEMPTS="${ITR_RAY_START_ATTEMPTS:-3}"
WAIT="${ITR_RAY_WAIT:-120}"
WORKDIR="${ITR_WORKDIR:-$REPO/work/cluster}"
STATE="$TEMP_DIR/itr-cluster.state"
LOG="$TEMP_DIR/itr-cluster-start.log"

say() { printf 'start.sh: %s\n' "$*"; }
die() { printf 'start.sh: error: %s\n' "$*" >&2; exit 1; }

for var in WORKERS HEAD_CPUS WORKER_CPUS WORKER_GPUS OBJECT_STORE PORT DASH CLIENT_PORT AGENT_PORT START_ATTEMPTS WAIT; do
    [[ "${!var}" =~ ^[0-9]+$ ]] || die "$var must be a non-negative integer, got '${!var}'"
done
[[ "$TEMP_DIR" = /* ]] || die "ITR_RAY_TEMP_DIR must be an absolute path, got '$TEMP_DIR'"
[[ "$TEMP_DIR" =~ ^[A-Za-z0-9_./-]+$ ]] || die "ITR_RAY_TEMP_DIR may only hold letters, digits and _ . / -"
TEMP_DIR="${TEMP_DIR%/}"
# Ray puts unix sockets in <temp>/session_<date>_<time>_<usec>_<pid>/sockets/ (~67 characters below
# the temp dir), and a unix socket path must stay under 108 bytes.
# Worker node i uses <temp>/n<i> (see start_node below), so keep room for that suffix too.
(( ${#TEMP_DIR} + 4 <= 40 )) || die "ITR_RAY_TEMP_DIR is too long for Ray's unix sockets (36 characters at most)"
[[ "$WORKDIR" = /* ]] || WORKDIR="$PWD/$WORKDIR"

# The `ray` of the project's virtual environment, and its bin/ first on PATH: the raylets inherit
# PATH, so the `python` of a submitted job's entrypoint is the one that has the pipeline installed.
if [[ -n "${ITR_RAY_BIN:-}" ]]; then
    RAY_BIN="$ITR_RAY_BIN"
elif [[ -x "$REPO/.venv/bin/ray" ]]; then
    RAY_BIN="$REPO/.venv/bin/ray"
else
    RAY_BIN="$(command -v ray || true)"
fi
[[ -n "$RAY_BIN" && -x "$RAY_BIN" ]] || die "no 'ray' executable found: run 'make install' in $REPO or set ITR_RAY_BIN"
BIN_DIR="$(cd "$(dirname "$RAY_BIN")" && pwd)"
PY="$BIN_DIR/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"
export PATH="$BIN_DIR:$PATH"
export RAY_AUTH_MODE=token
unset RAY_ADDRESS  # `ray start --head` must not try to join another cluster
# Several nodes starting on one (possibly busy) machine: a node's Python agents can take longer than Ray's default
# deadlines to come up, and the raylet then kills itself ("Check failed" in node_manager.cc) or its workers.
export RAY_agent_register_timeout_ms="${RAY_agent_register_timeout_ms:-120000}"
export RAY_worker_register_timeout_seconds="${RAY_worker_register_timeout_seconds:-120}"

group_alive() { kill -0 -- "-$1" 2>/dev/null; }
# True when process group $1 still has its raylet (a raylet that aborted leaves its agents behind for a while).
raylet_alive() { ps -o args= -g "$1" 2>/dev/null | grep -q "raylet/raylet"; }

STOP_CMD="$HERE/stop.sh"
[[ -n "${ITR_RAY_TEMP_DIR:-}" ]] && STOP_CMD="ITR_RAY_TEMP_DIR=$TEMP_DIR $STOP_CMD"

print_usage() {
    local itr="itr"
    [[ -x "$BIN_DIR/itr" ]] && itr="$BIN_DIR/itr"
    cat <<EOF

Ray cluster up: head 127.0.0.1:$PORT + $WORKERS worker node(s), temp dir $TEMP_DIR
  dashboard:   http://127.0.0.1:$DASH   (bound to 127.0.0.1; the token is in ~/.ray/auth_token)

Submit the tiny pipeline as a Ray job (the driver runs on the head; the project folder is uploaded as the job's
working_dir; the workdir must be absolute, every node writes into it; jobs/configs/demo.yaml for the full demo):
  cd $REPO
  RAY_ADDRESS=http://127.0.0.1:$DASH $itr submit jobs/configs/tiny.yaml workdir=$WORKDIR

Or join the cluster from this shell (the driver runs here, tasks on every node):
  RAY_ADDRESS=127.0.0.1:$PORT RAY_AUTH_MODE=token $itr run jobs/configs/tiny.yaml workdir=$WORKDIR

Status:  RAY_AUTH_MODE=token $BIN_DIR/ray status --address=127.0.0.1:$PORT
Stop:    $STOP_CMD
EOF
}

# ---- already running? (idempotent)
if [[ -f "$STATE" ]]; then
    head_pgid="$(awk '$1 == "node" && $2 == "head" {print $3}' "$STATE")"
    if [[ -n "$head_pgid" ]] && group_alive "$head_pgid"; then
        PORT="$(awk '$1 == "port" {print $2}' "$STATE")"
        DASH="$(awk '$1 == "dashboard" {print $2}' "$STATE")"
        WORKERS="$(awk '$1 == "node" && $2 != "head" {n++} END {print n + 0}' "$STATE")"
        say "a cluster started by this script is already running (head process group $head_pgid)"
        print_usage
        exit 0
    fi
    say "removing stale state $STATE (its cluster is gone; run stop.sh if processes are left over)"
    rm -f "$STATE"
fi

# ---- ports must be free
port_in_use() {
    "$PY" - "$1" <<'PYEOF'
import socket, sys
port = int(sys.argv[1])
for host in ("127.0.0.1", "0.0.0.0"):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
    except OSError:
        sys.exit(0)  # in use
    finally:
        s.close()
sys.exit(1)
PYEOF
}
check_port() {  # name value variable
    (( $2 >= 1024 && $2 <= 65535 )) || die "$1 port $2 is out of range (set $3)"
    if (( $2 >= 10002 && $2 <= 19999 )); then
        die "$1 port $2 lies in Ray's worker port range 10002-19999 (set $3)"
    fi
    if port_in_use "$2"; then die "$1 port $2 is in use (set $3 to a free port)"; fi
}
check_port GCS "$PORT" ITR_RAY_PORT
check_port dashboard "$DASH" ITR_RAY_DASHBOARD_PORT
check_port "Ray Client" "$CLIENT_PORT" ITR_RAY_CLIENT_PORT
for ((i = 0; i <= WORKERS; i++)); do
    for ((k = 0; k < 4; k++)); do
        check_port "agent (node $i)" "$((AGENT_PORT + 4 * i + k))" ITR_RAY_AGENT_PORT
    done
done

mkdir -p -m 700 "$TEMP_DIR"
[[ -O "$TEMP_DIR" ]] || die "$TEMP_DIR belongs to another user; set ITR_RAY_TEMP_DIR"
: > "$LOG"

# A token for token authentication (no-op when ~/.ray/auth_token exists; the token goes to stdout,
# not to the terminal).
if ! err="$("$RAY_BIN" get-auth-token --generate 2>&1 >/dev/null)"; then
    die "could not create the Ray auth token: $err"
fi

# Runs `ray start ...` as the leader of a new process group and session, so that every daemon it
# spawns (gcs_server, raylet, dashboard, agents, workers) can be stopped by that group; returns the
# group id in NODE_PGID. `ray start` itself exits once the node is up.
# On a busy machine a node can miss `ray start`'s fixed 30 s registration deadline ("timed out during startup"):
# its raylet may still register later (a worker node gets up to ITR_RAY_WAIT seconds to log its start), or it has
# aborted because its dashboard agent took more than 15 s to report its ports (a slow Python start-up: "Check failed"
# in node_manager.cc). A head that missed the deadline, or a worker node that did not come up, is stopped (its whole
# process group) and started again, up to ITR_RAY_START_ATTEMPTS times; the next try finds the imports cached.
# Usage: start_node NAME NODE_TEMP_DIR RAY_START_ARGS...
start_node() {
    local name="$1" node_temp="$2"; shift 2
    local attempt deadline
    for ((attempt = 1; attempt <= START_ATTEMPTS; attempt++)); do
        say "starting $name node ..."
        printf '\n==== %s (attempt %s): ray start %s\n' "$name" "$attempt" "$*" >> "$LOG"
        "$PY" -c 'import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])' \
            "$RAY_BIN" start "$@" --temp-dir="$node_temp" --disable-usage-stats >> "$LOG" 2>&1 < /dev/null &
        NODE_PGID=$!
        printf 'node %s %s\n' "$name" "$NODE_PGID" >> "$STATE"
        if wait "$NODE_PGID"; then
            return 0
        fi
        if [[ "$(tail -n 5 "$LOG")" != *"timed out during startup"* ]]; then
            break
        fi
        if [[ "$name" != head ]]; then
            say "the $name node missed Ray's registration deadline (a busy machine?); waiting for it ..."
            deadline=$((SECONDS + WAIT))
            while (( SECONDS < deadline )) && raylet_alive "$NODE_PGID"; do
                if grep -q -s "Raylet of id" "$node_temp"/session_latest/logs/raylet*.out; then
                    say "the $name node is up"
                    return 0
                fi
                sleep 1
            done
        fi
        (( attempt < START_ATTEMPTS )) || break
        say "the $name node did not come up; starting it again"
        kill -KILL -- "-$NODE_PGID" 2>/dev/null || true
        grep -v "^node $name $NODE_PGID\$" "$STATE" > "$STATE.tmp" || true
        mv "$STATE.tmp" "$STATE"
        sleep 2
    done
    say "ray start for the $name node failed; its output:"
    tail -n 30 "$LOG" >&2
    return 1
}

# The ports of node $1's agents, on `ray start`'s command line: fixed, checked free above, and the raylet does not
# wait for the runtime-env agent and the metrics exporter to report theirs.
agent_ports() {
    local base=$((AGENT_PORT + 4 * $1))
    printf -- '--dashboard-agent-listen-port=%s --dashboard-agent-grpc-port=%s --metrics-export-port=%s ' \
        "$base" "$((base + 1))" "$((base + 2))"
    printf -- '--runtime-env-agent-port=%s' "$((base + 3))"
}

cleanup_on_failure() {
    say "start failed; stopping what was started (log: $LOG)"
    ITR_RAY_TEMP_DIR="$TEMP_DIR" "$HERE/stop.sh" || true
}

{
    printf '# written by cluster/local/start.sh; read by stop.sh\n'
    printf 'port %s\n' "$PORT"
    printf 'dashboard %s\n' "$DASH"
} > "$STATE"
trap cleanup_on_failure ERR
trap 'cleanup_on_failure; exit 130' INT TERM

# shellcheck disable=SC2046  # agent_ports prints several arguments
start_node head "$TEMP_DIR" --head \
    --port="$PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASH" \
    --ray-client-server-port="$CLIENT_PORT" \
    $(agent_ports 0) \
    --num-cpus="$HEAD_CPUS" --num-gpus=0 \
    --object-store-memory="$OBJECT_STORE"

# Every worker node gets its own temp dir. Nodes that share one unpack a job's working_dir into the same
# <session>/runtime_resources/working_dir_files/_ray_pkg_<hash>/ folder, and each node's runtime-env agent, on its
# first task of the job, deletes that folder and unpacks it again (Ray's working_dir plugin always overwrites):
# the driver, running from the head's copy, then fails to import modules that are gone for a moment
# ("No module named 'pipeline.data.instances'"). Nodes on different machines never share a folder.
for ((i = 1; i <= WORKERS; i++)); do
    mkdir -p -m 700 "$TEMP_DIR/n$i"
    # shellcheck disable=SC2046
    start_node "worker$i" "$TEMP_DIR/n$i" \
        --address="127.0.0.1:$PORT" \
        $(agent_ports "$i") \
        --num-cpus="$WORKER_CPUS" --num-gpus="$WORKER_GPUS" \
        --object-store-memory="$OBJECT_STORE"
done
trap - ERR INT TERM

# ---- wait until every node is registered (the autoscaler's view lags a few seconds)
say "waiting for $((WORKERS + 1)) nodes to be active ..."
status=""
active=0
deadline=$((SECONDS + WAIT))
while (( SECONDS < deadline )); do
    status="$("$RAY_BIN" status --address="127.0.0.1:$PORT" 2>&1 || true)"
    active="$(printf '%s\n' "$status" | awk '/^(Active|Idle):/ {on = 1; next} /^[A-Z][A-Za-z ]*:/ {on = 0} on && /node_/ {n++} END {print n + 0}')"
    (( active >= WORKERS + 1 )) && break
    sleep 1
done
if (( active < WORKERS + 1 )); then
    say "warning: only $active of $((WORKERS + 1)) nodes reported active so far; 'ray status' says:"
    printf '%s\n' "$status"
fi

print_usage
