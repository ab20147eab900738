#!/usr/bin/env bash
# Metadata benchmark: a 3-node Cairn metadata cluster (127.0.0.1-3) against a
# 3-node etcd cluster (127.0.0.11-13), on loopback, in the same run.
#
# Workload matrix: {put, get} x {1, 32 clients}, 1 KiB values, linearizable
# reads on both. Prints a table (ops/s, p50, p99 and Cairn/etcd ratios) and
# writes it with the raw driver lines to "$OUT/latest.txt" (OUT defaults to
# benches/metadata/results). Everything started here is stopped by PID on exit.
#
# Knobs (environment): OPS_1 (2000), OPS_32 (8000), VALUE_SIZE (1024),
# KEYSPACE (1000), RUN_TIMEOUT seconds per driver run (240), SKIP_BUILD=1,
# KEEP=1 (keep the temporary folder), HOLD=1 (start, preload, then keep both
# clusters running for profiling until stopped), ETCD (etcd binary, default: etcd),
# CAIRN_RPC_PORT (17100), CAIRN_API_PORT (18443), ETCD_CLIENT_PORT (12379),
# ETCD_PEER_PORT (12380), CAIRN (the cairn binary; default: the one built here),
# CAIRN_ISCSI_PORT (the nodes' iSCSI port; default 3260).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}
OUT=${OUT:-$REPO/benches/metadata/results}
OPS_1=${OPS_1:-2000}
OPS_32=${OPS_32:-8000}
VALUE_SIZE=${VALUE_SIZE:-1024}
KEYSPACE=${KEYSPACE:-1000}
RUN_TIMEOUT=${RUN_TIMEOUT:-240}
ETCD=${ETCD:-etcd}
CAIRN_RPC_PORT=${CAIRN_RPC_PORT:-17100}
CAIRN_API_PORT=${CAIRN_API_PORT:-18443}
ETCD_CLIENT_PORT=${ETCD_CLIENT_PORT:-12379}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-12380}

CAIRN_IPS=(127.0.0.1 127.0.0.2 127.0.0.3)
ETCD_IPS=(127.0.0.11 127.0.0.12 127.0.0.13)

log() { printf '[metabench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- cleanup: stop by PID what we started, remove the temporary folder -------
PIDS=()
WORK=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${PIDS[@]+"${PIDS[@]}"}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]+"${PIDS[@]}"}"; do
        for _ in $(seq 1 150); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $WORK && -d $WORK ]]; then
        # Keep the server logs next to the results: they explain any error.
        mkdir -p "$OUT/logs"
        local f
        for f in "$WORK"/cairn/n*/node.log "$WORK"/etcd/e*/etcd.log; do
            [[ -f $f ]] || continue
            cp "$f" "$OUT/logs/$(basename "$(dirname "$f")")-$(basename "$f")"
        done
        [[ -f $WORK/driver.log ]] && cp "$WORK/driver.log" "$OUT/logs/driver.log"
        if [[ ${KEEP:-0} == 1 ]]; then
            log "kept $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- build -------------------------------------------------------------------
command -v "$ETCD" >/dev/null || die "etcd not found (Debian package etcd-server)"
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building cairn and cairn-metabench (debug) into $CARGO_TARGET_DIR"
    # The same package selection as scripts/test.sh: a subset (-p) resolves
    # features differently and would rebuild RocksDB's C++ for nothing.
    (cd "$REPO" && cargo build --workspace --all-targets)
fi
CAIRN=${CAIRN:-$CARGO_TARGET_DIR/debug/cairn}
DRIVER=$CARGO_TARGET_DIR/debug/cairn-metabench
[[ -x $CAIRN ]] || die "$CAIRN is missing"
[[ -x $DRIVER ]] || die "$DRIVER is missing"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$OUT/logs"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cairn-metabench.XXXXXX")
RAW=$WORK/raw.txt
: >"$RAW"
log "work folder $WORK"

alive() { kill -0 "$1" 2>/dev/null; }

# shellcheck source=../lib/cairn-cluster.sh
source "$HERE/../lib/cairn-cluster.sh"

# --- Cairn: init node 1, join 2 and 3 ----------------------------------------
start_cairn_cluster metabench

# --- etcd: static 3-member bootstrap -----------------------------------------
EPIDS=()
EDIRS=()
INITIAL=""
for i in 0 1 2; do
    INITIAL+="${INITIAL:+,}e$((i + 1))=http://${ETCD_IPS[$i]}:$ETCD_PEER_PORT"
done
for i in 0 1 2; do
    d=$WORK/etcd/e$((i + 1))
    EDIRS+=("$d")
    mkdir -p "$d"
    ip=${ETCD_IPS[$i]}
    "$ETCD" --name "e$((i + 1))" --data-dir "$d/data" \
        --listen-peer-urls "http://$ip:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "http://$ip:$ETCD_PEER_PORT" \
        --listen-client-urls "http://$ip:$ETCD_CLIENT_PORT" \
        --advertise-client-urls "http://$ip:$ETCD_CLIENT_PORT" \
        --initial-cluster "$INITIAL" --initial-cluster-state new \
        --initial-cluster-token cairn-metabench \
        --logger zap --log-outputs stderr >"$d/etcd.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    EPIDS+=("$pid")
    log "etcd member e$((i + 1)) pid $pid on $ip"
done

# --- readiness and leader-first endpoint order ---------------------------------
# One client talks to the first endpoint: put the leader first for both systems
# so the single-client runs measure the leader path (no follower forwarding) on
# both; the 32 clients spread round-robin over the three members.
order_endpoints() { # target eps... -> prints comma list, leader first
    local target=$1
    shift
    local eps
    eps=$(IFS=,; echo "$*")
    local extra=()
    [[ $target == cairn ]] && extra=(--data-dir "$C1")
    local leader
    leader=$("$DRIVER" --target "$target" --endpoints "$eps" "${extra[@]}" --timeout-secs 3 --find-leader 2>/dev/null) || return 1
    local out=$leader e
    for e in "$@"; do
        [[ $e == "$leader" ]] || out+=",$e"
    done
    echo "$out"
}
CEPS=""
for _ in $(seq 1 100); do
    check_cairn_alive
    CEPS=$(order_endpoints cairn "${CAIRN_IPS[@]/%/:$CAIRN_RPC_PORT}") && break
    sleep 0.3
done
[[ -n $CEPS ]] || die "Cairn nodes do not agree on a leader"
EEPS=""
for _ in $(seq 1 200); do
    for i in 0 1 2; do
        alive "${EPIDS[$i]}" || { tail -n 30 "${EDIRS[$i]}/etcd.log" >&2; die "etcd e$((i + 1)) exited; log above"; }
    done
    EEPS=$(order_endpoints etcd "${ETCD_IPS[@]/%/:$ETCD_CLIENT_PORT}") && break
    sleep 0.3
done
[[ -n $EEPS ]] || die "etcd members do not agree on a leader"
log "cairn endpoints (leader first): $CEPS"
log "etcd endpoints (leader first):  $EEPS"

# --- workload ------------------------------------------------------------------
FAILED=0
drive() { # target mode clients ops [record]
    local target=$1 mode=$2 clients=$3 ops=$4 record=${5:-yes}
    local eps=$CEPS extra=(--data-dir "$C1")
    if [[ $target == etcd ]]; then
        eps=$EEPS
        extra=()
    fi
    local line
    if line=$(timeout "$RUN_TIMEOUT" "$DRIVER" --target "$target" --endpoints "$eps" "${extra[@]}" \
        --mode "$mode" --clients "$clients" --ops "$ops" --value-size "$VALUE_SIZE" \
        --keyspace "$KEYSPACE" 2>>"$WORK/driver.log"); then
        :
    else
        line="target=$target mode=$mode clients=$clients ops=0 errors=$ops failed=1"
        FAILED=1
        log "run $target $mode x$clients FAILED; driver errors:"
        tail -n 5 "$WORK/driver.log" >&2 || true
    fi
    log "$line"
    case $line in *" errors=0 "*) ;; *) FAILED=1 ;; esac
    case $line in *" warmup_errors="[1-9]*) FAILED=1 ;; esac
    if [[ $record == yes ]]; then
        echo "$line" >>"$RAW"
    fi
}

log "preloading $KEYSPACE keys of $VALUE_SIZE bytes into both"
drive cairn put 32 "$KEYSPACE" no
drive etcd put 32 "$KEYSPACE" no

if [[ ${HOLD:-0} == 1 ]]; then
    # For profiling: keep both clusters up and say how to drive them.
    {
        echo "DRIVER=$DRIVER"
        echo "CEPS=$CEPS"
        echo "EEPS=$EEPS"
        echo "C1=$C1"
        echo "CAIRN_PIDS=\"${CPIDS[*]}\""
        echo "ETCD_PIDS=\"${EPIDS[*]}\""
    } >"$WORK/hold.env"
    log "HOLD=1: clusters up; variables in $WORK/hold.env; Ctrl-C or SIGTERM $$ stops them"
    # `wait` (not a foreground sleep) lets the EXIT trap run at once on a signal.
    while :; do
        sleep 3600 &
        wait $! || true
    done
fi

for mode in put get; do
    for clients in 1 32; do
        ops=$OPS_1
        [[ $clients == 1 ]] || ops=$OPS_32
        # Alternate the targets so slow drifts of the machine hit both alike.
        drive cairn "$mode" "$clients" "$ops"
        drive etcd "$mode" "$clients" "$ops"
    done
done

# --- report --------------------------------------------------------------------
{
    echo "# Cairn vs etcd metadata benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# 3 nodes each on loopback; cairn $("$CAIRN" --version 2>/dev/null | head -n 1) (debug build, mTLS);" \
        "etcd $("$ETCD" --version 2>/dev/null | head -n 1 | awk '{print $3}') (plaintext gRPC)"
    echo "# $(nproc) CPUs shared by the clients and all six servers; value $VALUE_SIZE B;" \
        "linearizable gets; single client talks to the leader"
    echo
    awk '
    function kv(line, key,    n, i, parts, p) {
        n = split(line, parts, " ")
        for (i = 1; i <= n; i++) {
            split(parts[i], p, "=")
            if (p[1] == key) return p[2]
        }
        return ""
    }
    function ratio(a, b) { return (b + 0 > 0 && a + 0 > 0) ? sprintf("%.2f", a / b) : "n/a" }
    {
        k = kv($0, "mode") " " kv($0, "clients")
        t = kv($0, "target")
        if (!(k in seen)) { seen[k] = 1; order[++n] = k }
        ops[k, t] = kv($0, "ops_per_s"); p50[k, t] = kv($0, "p50_us")
        p99[k, t] = kv($0, "p99_us"); err[k, t] = kv($0, "errors")
        w = kv($0, "warmup_errors"); if (w + 0 > 0) err[k, t] = err[k, t] "+" w "w"
        if (kv($0, "failed") == "1") ops[k, t] = "FAILED"
    }
    END {
        fmt = "%-4s %7s | %10s %8s %8s %6s | %10s %8s %8s %6s | %9s %8s\n"
        printf fmt, "mode", "clients", "cairn op/s", "p50 us", "p99 us", "err", "etcd op/s", "p50 us", "p99 us", "err", "op/s c/e", "p99 c/e"
        for (i = 1; i <= n; i++) {
            k = order[i]; split(k, m, " ")
            printf fmt, m[1], m[2], ops[k, "cairn"], p50[k, "cairn"], p99[k, "cairn"], err[k, "cairn"], \
                ops[k, "etcd"], p50[k, "etcd"], p99[k, "etcd"], err[k, "etcd"], \
                ratio(ops[k, "cairn"], ops[k, "etcd"]), ratio(p99[k, "cairn"], p99[k, "etcd"])
        }
    }' "$RAW"
    echo
    echo "# op/s c/e > 1: Cairn has more throughput; p99 c/e < 1: Cairn has the lower tail latency."
    echo "# err: failed timed ops (+Nw: failed untimed warm-up reads, one per client)."
    echo "# raw driver lines:"
    cat "$RAW"
} | tee "$OUT/latest.txt"
log "results in $OUT/latest.txt, server logs in $OUT/logs"
if [[ $FAILED == 1 ]]; then
    log "some runs had errors or failed: see $OUT/logs (driver.log has the driver's messages)"
    exit 1
fi
