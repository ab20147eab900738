#!/usr/bin/env bash
# Data benchmark: block I/O through the front-end trait (BlockDevice, reached
# with DataReplica.Forward over mTLS) on a 3-node Cairn cluster (127.0.0.1-3),
# RF1 and RF2 vdisks, against the same pattern on a plain local file (pwrite +
# fdatasync, pread) on the same file system, in the same run.
#
# Workload matrix: {seq 1 MiB, rand 4 KiB} x {write, read} x {QD1, QD32}.
# Prints a table (MB/s, IOPS, p99 and the ratio to the file) and writes it with
# the raw driver lines to "$OUT/latest.txt" (OUT defaults to
# benches/data/results). Everything started here is stopped by PID on exit.
#
# Knobs (environment): CELL_SECS seconds per cell (4), CELL_OPS I/O cap per
# cell (0: none), WORKING_SET_MB per vdisk and for the file (256), VDISK_SIZE
# (1G), PREFILL_QD (8), RUN_TIMEOUT seconds per driver run (300), SKIP_BUILD=1,
# CAIRN (the cairn binary to run; default the one just built),
# KEEP=1 (keep the temporary folder), CAIRN_RPC_PORT (17200), CAIRN_API_PORT
# (18543).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}
OUT=${OUT:-$REPO/benches/data/results}
CELL_SECS=${CELL_SECS:-4}
CELL_OPS=${CELL_OPS:-0}
WORKING_SET_MB=${WORKING_SET_MB:-256}
VDISK_SIZE=${VDISK_SIZE:-1G}
PREFILL_QD=${PREFILL_QD:-8}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
CAIRN_RPC_PORT=${CAIRN_RPC_PORT:-17200}
CAIRN_API_PORT=${CAIRN_API_PORT:-18543}

CAIRN_IPS=(127.0.0.1 127.0.0.2 127.0.0.3)
MIB=1048576
WS=$((WORKING_SET_MB * MIB))

log() { printf '[databench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
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
        for f in "$WORK"/cairn/n*/node.log; do
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
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building cairn and cairn-databench (debug) into $CARGO_TARGET_DIR"
    # The same package selection as scripts/test.sh: a subset (-p) resolves
    # features differently and would rebuild RocksDB's C++ for nothing.
    (cd "$REPO" && cargo build --workspace --all-targets)
fi
CAIRN=${CAIRN:-$CARGO_TARGET_DIR/debug/cairn}
DRIVER=$CARGO_TARGET_DIR/debug/cairn-databench
[[ -x $CAIRN ]] || die "$CAIRN is missing"
[[ -x $DRIVER ]] || die "$DRIVER is missing"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$OUT/logs"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cairn-databench.XXXXXX")
RAW=$WORK/raw.txt
: >"$RAW"
log "work folder $WORK"

alive() { kill -0 "$1" 2>/dev/null; }

json_field() { # field: reads one JSON object on stdin
    if command -v jq >/dev/null; then
        jq -r ".$1"
    else
        python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
    fi
}
# shellcheck source=../lib/cairn-cluster.sh
source "$HERE/../lib/cairn-cluster.sh"

# --- Cairn: init node 1, join 2 and 3 ----------------------------------------
start_cairn_cluster databench

# --- datastores and vdisks (owned by node 1, which the driver talks to) --------
declare -A VDISK
for rf in 1 2; do
    "$CAIRN" --data-dir "$C1" -o json datastore create "bench-rf$rf" --rf "$rf" >/dev/null
    VDISK[rf$rf]=$("$CAIRN" --data-dir "$C1" -o json vdisk create --datastore "bench-rf$rf" \
        "vd-rf$rf" --size "$VDISK_SIZE" --owner 1 | json_field id)
    [[ -n ${VDISK[rf$rf]} && ${VDISK[rf$rf]} != null ]] || die "no id for the RF$rf vdisk"
    log "RF$rf vdisk ${VDISK[rf$rf]} ($VDISK_SIZE, owner node 1)"
done
FILE=$WORK/file/baseline.img
mkdir -p "$(dirname "$FILE")"
log "file baseline $FILE ($(df -PT "$WORK" | awk 'NR == 2 {print $2 " on " $1}'))"

# --- workload ------------------------------------------------------------------
FAILED=0
RPC1=${CAIRN_IPS[0]}:$CAIRN_RPC_PORT
TARGS=()
set_target() { # target -> the driver's target arguments in TARGS
    case $1 in
    file) TARGS=(--target file --label file --file "$FILE") ;;
    rf*) TARGS=(--target cairn --label "$1" --endpoint "$RPC1" --data-dir "$C1" --vdisk "${VDISK[$1]}") ;;
    *) die "unknown target $1" ;;
    esac
}
drive() { # target mode pattern bs qd secs ops record [extra...]
    local target=$1 mode=$2 pattern=$3 bs=$4 qd=$5 secs=$6 ops=$7 record=$8
    shift 8
    local line
    set_target "$target"
    if line=$(timeout "$RUN_TIMEOUT" "$DRIVER" "${TARGS[@]}" --mode "$mode" --pattern "$pattern" \
        --bs "$bs" --qd "$qd" --working-set "$WS" --secs "$secs" --ops "$ops" "$@" \
        2>>"$WORK/driver.log"); then
        :
    else
        line="target=$target mode=$mode pattern=$pattern bs=$bs qd=$qd ops=0 errors=1 failed=1"
        FAILED=1
        log "run $target $pattern $mode bs=$bs qd=$qd FAILED; driver errors:"
        tail -n 5 "$WORK/driver.log" >&2 || true
    fi
    log "$line"
    case $line in *" errors=0 "*) ;; *) FAILED=1 ;; esac
    case $line in *" warmup_errors="[1-9]*) FAILED=1 ;; esac
    if [[ $record == yes ]]; then
        echo "$line" >>"$RAW"
    fi
}

# The data service places replicas once the nodes' disks are registered in
# metadata: wait until one 1 MiB write at offset 0 succeeds on each vdisk
# (the prefill overwrites it).
for t in rf1 rf2; do
    ok=0
    for _ in $(seq 1 60); do
        check_cairn_alive
        set_target "$t"
        if timeout 60 "$DRIVER" "${TARGS[@]}" --mode write --pattern seq --bs "$MIB" --qd 1 \
            --working-set "$WS" --secs 0 --ops 1 >/dev/null 2>>"$WORK/driver.log"; then
            ok=1
            break
        fi
        sleep 1
    done
    [[ $ok == 1 ]] || die "the $t vdisk does not accept writes; see $OUT/logs"
done
log "both vdisks accept writes"

# Prefill: the whole working set, sequential 1 MiB writes, on all three, so
# that every later write overwrites allocated space and reads hit real data.
log "prefilling $WORKING_SET_MB MiB on file, rf1 and rf2 (QD$PREFILL_QD)"
for t in file rf1 rf2; do
    drive "$t" write seq "$MIB" "$PREFILL_QD" 0 $((WS / MIB)) no
done
[[ $FAILED == 0 ]] || die "prefill failed; see $OUT/logs"

# Alternate the targets in every cell so slow drifts of the machine hit all alike.
for row in "seq $MIB write" "seq $MIB read" "rand 4096 write" "rand 4096 read"; do
    read -r pattern bs mode <<<"$row"
    for qd in 1 32; do
        for t in file rf1 rf2; do
            drive "$t" "$mode" "$pattern" "$bs" "$qd" "$CELL_SECS" "$CELL_OPS" yes
        done
    done
done

# --- report --------------------------------------------------------------------
{
    echo "# Cairn data path vs local file, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# cairn $("$CAIRN" --version 2>/dev/null | head -n 1) (debug build), 3 nodes on loopback;" \
        "I/O through node 1 (vdisk owner) via DataReplica.Forward -> BlockDevice (mTLS)"
    echo "# file: pwrite+fdatasync / pread on $(df -PT "$WORK" | awk 'NR == 2 {print $2}'), same file system as the nodes' disks;" \
        "$(nproc) CPUs shared by the driver and the three nodes"
    echo "# working set $WORKING_SET_MB MiB per target, prefilled; ${CELL_SECS}s per cell; MB = 10^6 bytes"
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
    function ratio(a, b,    r) {
        if (!(b + 0 > 0 && a + 0 > 0)) return "n/a"
        r = a / b
        return r >= 0.1 ? sprintf("%.2f", r) : sprintf("%.3f", r)
    }
    function size(bs) { return bs >= 1048576 ? (bs / 1048576) "M" : (bs / 1024) "K" }
    {
        k = kv($0, "pattern") " " size(kv($0, "bs")) " " kv($0, "mode") "|QD" kv($0, "qd")
        t = kv($0, "target")
        if (!(k in seen)) { seen[k] = 1; order[++n] = k }
        mb[k, t] = kv($0, "mb_per_s"); iops[k, t] = sprintf("%.0f", kv($0, "iops"))
        p99[k, t] = kv($0, "p99_us")
        e = kv($0, "errors") + kv($0, "warmup_errors")
        if (kv($0, "failed") == "1") { mb[k, t] = "FAILED"; iops[k, t] = "-"; p99[k, t] = "-" }
        if (e > 0) errs = errs sprintf("#   %s %s: %d errors\n", t, k, e)
    }
    END {
        fmt = "%-14s %4s | %8s %7s %7s | %8s %7s %7s %6s | %8s %7s %7s %6s\n"
        printf fmt, "", "", "file", "", "", "RF1", "", "", "", "RF2", "", "", ""
        printf fmt, "workload", "QD", "MB/s", "IOPS", "p99 us", "MB/s", "IOPS", "p99 us", "x file", "MB/s", "IOPS", "p99 us", "x file"
        for (i = 1; i <= n; i++) {
            k = order[i]; split(k, m, "|")
            printf fmt, m[1], m[2], mb[k, "file"], iops[k, "file"], p99[k, "file"], \
                mb[k, "rf1"], iops[k, "rf1"], p99[k, "rf1"], ratio(mb[k, "rf1"], mb[k, "file"]), \
                mb[k, "rf2"], iops[k, "rf2"], p99[k, "rf2"], ratio(mb[k, "rf2"], mb[k, "file"])
        }
        print ""
        print "# x file: throughput (MB/s, equally IOPS) as a fraction of the local file'"'"'s in the same cell."
        if (errs != "") printf "# errors:\n%s", errs
        else print "# errors: none"
    }' "$RAW"
    echo "# raw driver lines:"
    cat "$RAW"
} | tee "$OUT/latest.txt"
log "results in $OUT/latest.txt, server logs in $OUT/logs"
if [[ $FAILED == 1 ]]; then
    log "some runs had errors or failed: see $OUT/logs (driver.log has the driver's messages)"
    exit 1
fi
