#!/usr/bin/env bash
# The cluster part of ops/README.md's runbook, on loopback, as written there:
#   1. three nodes from ops/nats/cluster-node.conf, then `fleet ops init --replicas 3`;
#   2. `fleet ops status`; a backup with `fleet ops export` and `fleet ops import --check`;
#   3. one node lost and back (the cluster keeps serving);
#   4. a rolling restart, one node at a time, waiting for /healthz (how nats-server is
#      upgraded);
#   5. quorum lost (two nodes down: the streams stop answering) and recovered by bringing
#      the nodes back with their stores.
# Usage: ops/runbook/cluster.sh WORKDIR   (nats-server and fleet on PATH)
# Every server it starts is stopped on exit, by pid.
set -euo pipefail

work=${1:?usage: cluster.sh WORKDIR}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work"
work=$(cd "$work" && pwd)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
say() { echo "runbook: $*"; }

declare -a client route http pid
for i in 1 2 3; do
    client[i]=$(free_port); route[i]=$(free_port); http[i]=$(free_port)
done
urls="nats://127.0.0.1:${client[1]},nats://127.0.0.1:${client[2]},nats://127.0.0.1:${client[3]}"

stop_all() {
    for i in 1 2 3; do
        if [ -n "${pid[i]:-}" ] && kill -0 "${pid[i]}" 2>/dev/null; then
            kill "${pid[i]}"; wait "${pid[i]}" 2>/dev/null || true
        fi
    done
}
trap stop_all EXIT

# Step 1: a config per node from the shipped one: its name, addresses and store.
for i in 1 2 3; do
    sed -e "s|^server_name: fleet-1 .*|server_name: fleet-$i|" \
        -e "s|^listen: 0.0.0.0:4222|listen: 127.0.0.1:${client[i]}|" \
        -e "s|^http: 127.0.0.1:8222|http: 127.0.0.1:${http[i]}|" \
        -e "s|store_dir: /var/lib/fleetbus/nats|store_dir: $work/n$i/store|" \
        -e "s|listen: 0.0.0.0:6222|listen: 127.0.0.1:${route[i]}|" \
        -e "s|nats-route://node1.example:6222|nats-route://127.0.0.1:${route[1]}|" \
        -e "s|nats-route://node2.example:6222|nats-route://127.0.0.1:${route[2]}|" \
        -e "s|nats-route://node3.example:6222|nats-route://127.0.0.1:${route[3]}|" \
        "$here/nats/cluster-node.conf" > "$work/n$i.conf"
    mkdir -p "$work/n$i"
done

start_node() {  # start_node I: start, wait for "Server is ready" in its log
    local i=$1 log="$work/n$1/server.log"
    : > "$log"
    nats-server -c "$work/n$i.conf" > "$log" 2>&1 &
    pid[i]=$!
    for _ in $(seq 1 100); do
        grep -q "Server is ready" "$log" && return 0
        sleep 0.1
    done
    say "node $i did not start:"; tail -20 "$log"; return 1
}

stop_node() { kill "${pid[$1]}"; wait "${pid[$1]}" 2>/dev/null || true; pid[$1]=; }

healthy() {  # healthy I: wait (60 s) until the node's /healthz says ok
    local url="http://127.0.0.1:${http[$1]}/healthz"
    for _ in $(seq 1 120); do
        if python3 -c "import sys,urllib.request; sys.exit(0 if b'ok' in urllib.request.urlopen('$url', timeout=2).read() else 1)" 2>/dev/null; then
            return 0
        fi
        sleep 0.5
    done
    say "node $1 never became healthy"; return 1
}

status_ok() {  # status_ok URLS: fleet ops status answers (every stream has a leader)
    fleet ops status -s "$1" --json > "$work/status.json"
}

say "step 1: start three nodes and create the streams with three replicas"
for i in 1 2 3; do start_node "$i"; done
fleet ops init --replicas 3 -s "$urls"
fleet ops init --replicas 3 -s "$urls"  # idempotent: nothing to do

say "step 2: status and a backup"
status_ok "$urls"
fleet ops status -s "$urls"
fleet ops export "$work/backup.export" -s "$urls"
fleet ops import "$work/backup.export" --check

say "step 3: one node lost, the cluster keeps serving, the node comes back"
stop_node 3
status_ok "nats://127.0.0.1:${client[1]},nats://127.0.0.1:${client[2]}"
start_node 3
healthy 3

say "step 4: rolling restart (upgrade nats-server one node at a time)"
for i in 1 2 3; do
    stop_node "$i"
    start_node "$i"   # the upgraded binary would start here
    healthy "$i"
done
status_ok "$urls"

say "step 5: quorum lost, then recovered by bringing the nodes back"
stop_node 2
stop_node 3
# The survivor's streams either stop answering or, while a leader has not yet stepped
# down, `fleet ops status` says their quorum is lost. Ask until one of the two (bounded).
lost=no
for _ in $(seq 1 60); do
    if ! fleet ops status -s "nats://127.0.0.1:${client[1]}" --json > "$work/lost.json" 2> "$work/lost.err" \
        || grep -q '"quorum": false' "$work/lost.json"; then
        lost=yes; break
    fi
    sleep 1
done
if [ "$lost" != yes ]; then
    say "expected no answer, or a lost quorum, without two of the three nodes"
    cat "$work/lost.json" "$work/lost.err"; tail -20 "$work/n1/server.log"; exit 1
fi
start_node 2
start_node 3
for i in 1 2 3; do healthy "$i"; done
for _ in $(seq 1 60); do status_ok "$urls" 2>/dev/null && break; sleep 0.5; done
status_ok "$urls"

say "cluster steps passed"
