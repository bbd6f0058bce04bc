#!/usr/bin/env bash
# Stops the local multi-node Ray cluster started by cluster/local/start.sh, and only that one.
#
#   cluster/local/stop.sh
#
# Settings (environment variables, optional):
#   ITR_RAY_TEMP_DIR     the temp dir given to start.sh               (/tmp/itr-ray-<uid>)
#   ITR_RAY_STOP_GRACE   seconds to wait after SIGTERM before SIGKILL  (15)
#
# How: start.sh ran every `ray start` as the leader of its own process group and recorded the group
# ids in <temp dir>/itr-cluster.state. This script sends SIGTERM to the worker nodes' groups, then
# to the head's, waits up to the grace period, SIGKILLs whatever is left in those groups, and
# finally SIGKILLs leftover processes of this user whose command line names the temp dir (a
# gcs_server, raylet, dashboard or autoscaler monitor that outlived its group). It never runs a
# bare `ray stop`: that stops every Ray cluster of this user on the machine, not just this one.
# Safe to run twice; logs stay in the temp dir (remove it by hand to free the space).
set -euo pipefail

TEMP_DIR="${ITR_RAY_TEMP_DIR:-/tmp/itr-ray-$(id -u)}"
GRACE="${ITR_RAY_STOP_GRACE:-15}"
STATE="$TEMP_DIR/itr-cluster.state"

say() { printf 'stop.sh: %s\n' "$*"; }
die() { printf 'stop.sh: error: %s\n' "$*" >&2; exit 1; }

[[ "$TEMP_DIR" = /* ]] || die "ITR_RAY_TEMP_DIR must be an absolute path, got '$TEMP_DIR'"
TEMP_DIR="${TEMP_DIR%/}"
[[ "$GRACE" =~ ^[0-9]+$ ]] || die "ITR_RAY_STOP_GRACE must be a whole number of seconds, got '$GRACE'"

# Processes of this user as "pid pgid args...".
processes() { ps -ww -u "$(id -u)" -o pid= -o pgid= -o args= 2>/dev/null || true; }

# Pids of this user's processes whose command line names the temp dir (as an argument, or after
# `--flag=`), this script excepted.
temp_dir_pids() {
    processes | D="$TEMP_DIR" SELF="$$" awk '
        $1 == ENVIRON["SELF"] { next }
        {
            for (i = 3; i <= NF; i++) {
                f = $i; sub(/^[^=]*=/, "", f)
                if (f == ENVIRON["D"] || index(f, ENVIRON["D"] "/") == 1) { print $1; next }
            }
        }'
}

# True when process group $1 still has a member that is one of ours: a Ray worker ("ray::...") or
# a process naming the temp dir. Guards against a recorded group id that was reused since.
group_is_ours() {
    processes | D="$TEMP_DIR" G="$1" awk '
        $2 != ENVIRON["G"] { next }
        $3 ~ /^ray::/ { found = 1 }
        {
            for (i = 3; i <= NF; i++) {
                f = $i; sub(/^[^=]*=/, "", f)
                if (f == ENVIRON["D"] || index(f, ENVIRON["D"] "/") == 1) found = 1
            }
        }
        END { exit found ? 0 : 1 }'
}

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

# ---- recorded process groups: worker nodes first, the head last
head_pgid=""
worker_pgids=()
if [[ -f "$STATE" ]]; then
    while read -r kind name pgid _; do
        [[ "$kind" == node && "$pgid" =~ ^[0-9]+$ ]] || continue
        if [[ "$name" == head ]]; then head_pgid="$pgid"; else worker_pgids+=("$pgid"); fi
    done < "$STATE"
else
    say "no state file $STATE (start.sh not run, or already stopped); looking for leftovers only"
fi

groups=()
for pgid in ${worker_pgids[@]+"${worker_pgids[@]}"} $head_pgid; do
    if ! group_alive "$pgid"; then
        continue
    elif group_is_ours "$pgid"; then
        groups+=("$pgid")
    else
        say "skipping process group $pgid: it no longer runs this cluster's processes"
    fi
done

any_alive() {
    local pgid
    for pgid in ${groups[@]+"${groups[@]}"}; do
        group_alive "$pgid" && return 0
    done
    [[ -n "$(temp_dir_pids)" ]]
}

if (( ${#groups[@]} )); then
    for pgid in "${groups[@]}"; do
        if [[ "$pgid" == "$head_pgid" ]]; then
            sleep 1  # let the worker nodes deregister before the GCS goes
            say "stopping the head node (process group $pgid)"
        else
            say "stopping a worker node (process group $pgid)"
        fi
        kill -TERM -- "-$pgid" 2>/dev/null || true
    done
fi

# ---- grace period, then SIGKILL what is left
if any_alive; then
    say "waiting up to ${GRACE}s for Ray processes to exit ..."
    for ((t = 0; t < GRACE * 2; t++)); do
        any_alive || break
        sleep 0.5
    done
fi
for pgid in ${groups[@]+"${groups[@]}"}; do
    if group_alive "$pgid"; then
        say "process group $pgid still alive after ${GRACE}s: SIGKILL"
        kill -KILL -- "-$pgid" 2>/dev/null || true
    fi
done
leftover="$(temp_dir_pids)"
if [[ -n "$leftover" ]]; then
    # shellcheck disable=SC2086  # one pid per word
    say "killing leftover processes that use $TEMP_DIR (e.g. gcs_server): $(echo $leftover)"
    # shellcheck disable=SC2086
    kill -KILL $leftover 2>/dev/null || true
fi

rm -f "$STATE"
if (( ${#groups[@]} )) || [[ -n "$leftover" ]]; then
    say "cluster stopped; logs kept under $TEMP_DIR"
else
    say "nothing to stop"
fi
