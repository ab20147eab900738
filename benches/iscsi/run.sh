#!/usr/bin/env bash
# iSCSI benchmark: Cairn's iSCSI target (RF1 and RF2 vdisks of a 3-node
# cluster) against the peer tgt and the local file, in ONE run, on the same
# backing kind (tgt's backing file and the Cairn nodes' disks live in the same
# work folder, i.e. on the same file system).
#
#  1. qemu-img bench matrix: ../shared/peers/run-block-peers.sh (file, qemu-nbd
#     and tgt on one backing file) with EXTRA="cairn-rf1=URL cairn-rf2=URL";
#  2. fio 4 KiB random read/write at QD1/QD32 with fio's libiscsi engine
#     (../shared/peers/bin/fio) on tgt, cairn-rf1 and cairn-rf2 (libaio on the
#     file), the targets interleaved in every cell, the same job for all;
#  3. a table: every row, tgt, cairn-rf1, rf1/tgt, cairn-rf2, rf2/tgt, and
#     whether the targets are met (>= 1.5x tgt at RF1, >= 1.0x tgt at RF2).
# Results: $OUT/latest.txt (the table and the raw lines), block-peers.txt,
# fio.txt, logs/. OUT defaults to benches/iscsi/results (gitignored).
#
# Cairn: unless CAIRN_URL_RF1/CAIRN_URL_RF2 (or CAIRN_URL, for both) are given,
# builds cairn (dev profile), starts a 3-node cluster on 127.0.0.1-3
# (benches/lib/cairn-cluster.sh), creates datastores bench-rf1/bench-rf2 with one
# SIZE vdisk each owned by node 1 and targets iqn.2026-11.io.cairn:bench-rf{1,2}
# (`cairn iscsi target create IQN --lun 0=DATASTORE/VDISK`), and benchmarks
# iscsi://127.0.0.1:CAIRN_ISCSI_PORT/IQN/0. With the URLs given, no cluster is
# started: any iSCSI target can be measured in Cairn's columns.
#
# Knobs (environment): SIZE (1G: tgt backing, vdisks, fio --size) REPS (1: each
# qemu-img cell keeps the fastest of REPS runs, each fio cell the best of REPS)
# FIO_RUNTIME (10 s per fio cell) TMO (20 s per qemu-img bench call) FIO (fio with
# libiscsi) BENCH_DIR (parent of the work folder; ${TMPDIR:-/tmp}) ISCSI_PORT
# (3261: tgt on 127.0.0.1) TGT_CTRL_PORT (23) NBD_PORT (10819) CAIRN_RPC_PORT
# (17300) CAIRN_API_PORT (18643) CAIRN_ISCSI_PORT (13260) SKIP_BUILD=1 KEEP=1
# SKIP_QEMU_BENCH=1 (fio only) SKIP_FIO=1 (qemu-img bench only) CAIRN (the cairn
# binary to start; default the one built here, e.g. to compare two builds).
# Default run: about 6-8 minutes on 2 cores. Everything started here is stopped
# by PID on exit.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PEERS=${PEERS:-$(cd "$REPO/../shared/peers" && pwd)}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}
OUT=${OUT:-$HERE/results}
SIZE=${SIZE:-1G}
REPS=${REPS:-1}
FIO_RUNTIME=${FIO_RUNTIME:-10}
TMO=${TMO:-20}
FIO=${FIO:-$PEERS/bin/fio}
ISCSI_PORT=${ISCSI_PORT:-3261}
TGT_CTRL_PORT=${TGT_CTRL_PORT:-23}
NBD_PORT=${NBD_PORT:-10819}
CAIRN_RPC_PORT=${CAIRN_RPC_PORT:-17300}
CAIRN_API_PORT=${CAIRN_API_PORT:-18643}
CAIRN_ISCSI_PORT=${CAIRN_ISCSI_PORT:-13260}
TGT_IQN=iqn.2024-01.peer.tgt:lun0
CAIRN_IPS=(127.0.0.1 127.0.0.2 127.0.0.3)
MIB=1048576
SIZE_BYTES=$(numfmt --from=iec "$SIZE")
((SIZE_BYTES % MIB == 0)) || { echo "SIZE must be a whole number of MiB" >&2; exit 2; }

T0=$(date +%s)
log() { printf '[iscsibench %(%H:%M:%S)T +%ss] %s\n' -1 $(($(date +%s) - T0)) "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
alive() { kill -0 "$1" 2>/dev/null; }

# --- cleanup: stop by PID what we started, keep the logs, remove the work folder --
PIDS=()
WORK=""
TGT_STARTED=0
tgt_env() { env ADDR=127.0.0.1 PORT="$ISCSI_PORT" IQN="$TGT_IQN" BACKING="$BACKING" SIZE="$SIZE" \
    CTRL_PORT="$TGT_CTRL_PORT" PIDFILE="$WORK/tgtd.pid" LOG="$WORK/tgtd.log" "$@"; }
cleanup() {
    local rc=$? pid f
    trap - EXIT INT TERM
    if [[ $TGT_STARTED == 1 ]]; then tgt_env "$PEERS/iscsi-peer.sh" stop >/dev/null 2>&1 || true; fi
    for pid in "${PIDS[@]+"${PIDS[@]}"}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]+"${PIDS[@]}"}"; do
        for _ in $(seq 1 150); do alive "$pid" || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $WORK && -d $WORK ]]; then
        mkdir -p "$OUT/logs"
        for f in "$WORK"/cairn/n*/node.log; do
            [[ -f $f ]] && cp "$f" "$OUT/logs/$(basename "$(dirname "$f")")-node.log"
        done
        for f in "$WORK"/tgtd.log "$WORK"/client-errors.log; do [[ -f $f ]] && cp "$f" "$OUT/logs/"; done
        if [[ ${KEEP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    fi
    log "done in $(($(date +%s) - T0)) s (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$OUT/logs"
WORK=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/cairn-iscsibench.XXXXXX")
BACKING=$WORK/peer-block.img
log "work folder $WORK ($(df -PT "$WORK" | awk 'NR == 2 {print $2}')); results in $OUT"

# --- Cairn: the URLs, or a cluster of our own ----------------------------------------
URL_RF1=${CAIRN_URL_RF1:-${CAIRN_URL:-}}
URL_RF2=${CAIRN_URL_RF2:-${CAIRN_URL:-}}
CAIRN_DESC="given URLs"
# Its checks on the nodes do nothing when no node was started here.
# shellcheck source=../lib/cairn-cluster.sh
source "$HERE/../lib/cairn-cluster.sh"
if [[ -z $URL_RF1 || -z $URL_RF2 ]]; then
    [[ -z $URL_RF1 && -z $URL_RF2 ]] || die "give both CAIRN_URL_RF1 and CAIRN_URL_RF2 (or CAIRN_URL), or neither"
    if [[ ${SKIP_BUILD:-0} != 1 ]]; then
        log "building cairn (dev profile) into $CARGO_TARGET_DIR"
        # The same package selection as scripts/test.sh (a subset rebuilds RocksDB).
        (cd "$REPO" && cargo build --workspace --all-targets)
    fi
    CAIRN=${CAIRN:-$CARGO_TARGET_DIR/debug/cairn}
    [[ -x $CAIRN ]] || die "$CAIRN is missing"
    json_field() { jq -r ".$1"; }
    start_cairn_cluster iscsibench
    for rf in 1 2; do
        "$CAIRN" --data-dir "$C1" -o json datastore create "bench-rf$rf" --rf "$rf" >/dev/null
        "$CAIRN" --data-dir "$C1" -o json vdisk create --datastore "bench-rf$rf" "vd-rf$rf" \
            --size "$SIZE" --owner 1 >/dev/null
        "$CAIRN" --data-dir "$C1" iscsi target create "iqn.2026-11.io.cairn:bench-rf$rf" \
            --lun "0=bench-rf$rf/vd-rf$rf" >/dev/null
        log "RF$rf: vdisk bench-rf$rf/vd-rf$rf ($SIZE, owner node 1), target iqn.2026-11.io.cairn:bench-rf$rf LUN 0"
    done
    URL_RF1=iscsi://${CAIRN_IPS[0]}:$CAIRN_ISCSI_PORT/iqn.2026-11.io.cairn:bench-rf1/0
    URL_RF2=iscsi://${CAIRN_IPS[0]}:$CAIRN_ISCSI_PORT/iqn.2026-11.io.cairn:bench-rf2/0
    CAIRN_DESC="cairn $("$CAIRN" --version 2>/dev/null | head -n 1) (dev profile), 3 nodes on 127.0.0.1-3, I/O through node 1 (owner)"
fi
# Wait until each Cairn LUN takes a write (replicas are placed once the nodes'
# disks are registered), then prefill it untimed, as bench-block.sh does for the
# file: later writes overwrite allocated space and reads return real data.
for u in "$URL_RF1" "$URL_RF2"; do
    wait_lun_writable "$u" "$WORK/client-errors.log"
    got=$(qemu-img info --output=json -f raw "$u" | jq -r '."virtual-size"')
    ((got >= SIZE_BYTES)) || die "$u has $got bytes, less than SIZE=$SIZE"
    log "prefilling $u ($SIZE)"
    qemu-img bench -f raw -t none -w -d 32 -s 1M -c $((SIZE_BYTES / MIB)) "$u" >/dev/null ||
        die "prefill of $u failed"
done

# --- tgt on the same file system, started here so fio can use it afterwards -------
if iscsi-ls "iscsi://127.0.0.1:$ISCSI_PORT/" >/dev/null 2>&1; then
    die "something already serves iSCSI on 127.0.0.1:$ISCSI_PORT (set ISCSI_PORT)"
fi
fallocate -l "$SIZE" "$BACKING"
# Written data, like the prefilled LUNs (reads of unwritten extents cost nothing).
qemu-img bench -f raw -t none -w -d 32 -s 1M -c $((SIZE_BYTES / MIB)) "$BACKING" >/dev/null ||
    die "prefill of $BACKING failed"
tgt_env "$PEERS/iscsi-peer.sh" start >"$WORK/tgt-start.txt"
TGT_STARTED=1
TGT_URL=iscsi://127.0.0.1:$ISCSI_PORT/$TGT_IQN/1
log "tgt on $TGT_URL, backing $BACKING"
for u in "$URL_RF1" "$URL_RF2"; do [[ $u != "$TGT_URL" ]] || die "a Cairn URL is the tgt URL"; done

# --- 1. qemu-img bench matrix (run-block-peers.sh) -----------------------------------
BLOCK=$OUT/block-peers.txt
: >"$BLOCK"
if [[ ${SKIP_QEMU_BENCH:-0} != 1 ]]; then
    log "qemu-img bench: file, nbd, tgt, cairn-rf1, cairn-rf2 (REPS=$REPS, TMO=${TMO}s)"
    # tgt is already up on ISCSI_PORT: run-block-peers.sh uses it as-is. Its own fio
    # part (file and tgt only) is skipped (FIO=/nonexistent): step 2 runs the same
    # jobs on every target, interleaved.
    BACKING=$BACKING NBD_PORT=$NBD_PORT ISCSI_PORT=$ISCSI_PORT IQN=$TGT_IQN REPS=$REPS TMO=$TMO \
        FIO=/nonexistent EXTRA="cairn-rf1=$URL_RF1 cairn-rf2=$URL_RF2" \
        "$PEERS/run-block-peers.sh" "$BLOCK" >&2 || die "run-block-peers.sh failed"
fi

# --- 2. fio, interleaved -------------------------------------------------------------------
FIOOUT=$OUT/fio.txt
: >"$FIOOUT"
fio_target() { # label -> fio arguments in FARGS
    local u
    case $1 in
    file) FARGS=(--ioengine=libaio --direct=1 --filename="$BACKING"); return ;;
    tgt) u=$TGT_URL ;;
    cairn-rf1) u=$URL_RF1 ;;
    cairn-rf2) u=$URL_RF2 ;;
    esac
    FARGS=(--ioengine=libiscsi --filename="${u//:/\\:}") # fio splits file names at ':'
}
if [[ ${SKIP_FIO:-0} != 1 ]]; then
    [[ -x $FIO ]] || die "no fio at $FIO"
    log "fio $("$FIO" --version): 4 KiB random read/write, QD1/QD32, ${FIO_RUNTIME}s per cell, REPS=$REPS"
    echo "## fio $("$FIO" --version) (true random, latency percentiles; runtime ${FIO_RUNTIME}s each, best of $REPS)" >>"$FIOOUT"
    for rw in randread randwrite; do for qd in 1 32; do
        for t in file tgt cairn-rf1 cairn-rf2; do
            fio_target "$t"
            best="" bestiops=-1
            for _ in $(seq "$REPS"); do
                check_cairn_alive
                line=$(timeout $((FIO_RUNTIME + 60)) "$FIO" --name=b --rw=$rw --bs=4k --iodepth=$qd \
                    --size="$SIZE_BYTES" --time_based --runtime="$FIO_RUNTIME" "${FARGS[@]}" \
                    --output-format=json 2>>"$WORK/client-errors.log" | python3 -c '
import json,sys
s=sys.stdin.read(); j=json.loads(s[s.index("{"):])["jobs"][0]
if j.get("error"): raise SystemExit(1)
k="read" if j["read"]["io_bytes"] else "write"; d=j[k]
p=d["clat_ns"].get("percentile",{})
f=lambda q: p.get(q,0)/1000
print("iops=%d p50=%.0fus p99=%.0fus p99.9=%.0fus" % (d["iops"], f("50.000000"), f("99.000000"), f("99.900000")))') ||
                    line="FAILED"
                iops=$(sed -n 's/^iops=\([0-9]*\) .*/\1/p' <<<"$line")
                if [[ -n $iops ]] && ((iops > bestiops)); then best=$line bestiops=$iops; fi
                [[ -n $best ]] || best=$line
            done
            printf 'fio %-9s %-9s qd%-3s %s\n' "$t" "$rw" "$qd" "$best" | tee -a "$FIOOUT" >&2
        done
    done; done
fi

# --- 3. the table -----------------------------------------------------------------------------
{
    echo "# Cairn iSCSI vs tgt vs local file, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs shared by clients and servers"
    echo "# cairn-rf1 = $URL_RF1"
    echo "# cairn-rf2 = $URL_RF2"
    echo "# cairn: $CAIRN_DESC"
    echo "# tgt = $TGT_URL ($(tgtd --version 2>/dev/null || echo '?')); file = $BACKING ($(df -PT "$WORK" | awk 'NR == 2 {print $2}'), also behind tgt and qemu-nbd); size $SIZE"
    echo "# $(qemu-img --version | head -n 1); qemu-img rows: IOPS (1M rows: MiB-sized I/Os per second), REPS=$REPS"
    echo
    python3 - "$BLOCK" "$FIOOUT" <<'EOF'
import re, sys
block, fio = sys.argv[1], sys.argv[2]
rows, val = [], {}
def put(row, t, v):
    if row not in rows: rows.append(row)
    val[(row, t)] = v
for line in open(block):
    m = re.match(r'^(\S+-qd\d+)\s+(\S+)\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s*$', line)
    if m: put(m.group(1), m.group(2), int(m.group(3))); continue
    m = re.match(r'^ERROR (\S+) (\S+):', line)
    if m: put(m.group(2), m.group(1), None)
for line in open(fio):
    m = re.match(r'^fio (\S+)\s+(\S+)\s+qd(\d+)\s+(.*)$', line)
    if not m: continue
    row = 'fio-%s-4k-qd%s' % (m.group(2), m.group(3))
    i = re.match(r'iops=(\d+)', m.group(4))
    put(row, m.group(1), int(i.group(1)) if i else None)
fmt = '%-22s %9s %9s %10s %7s %10s %7s  %s'
print(fmt % ('row', 'file', 'tgt', 'cairn-rf1', 'rf1/tgt', 'cairn-rf2', 'rf2/tgt', 'met (rf1>=1.5, rf2>=1.0)'))
def cell(v): return '-' if v is None else str(v)
met_all, missing = True, False
for row in rows:
    f, t, r1, r2 = (val.get((row, k)) for k in ('file', 'iscsi' if not row.startswith('fio-') else 'tgt', 'cairn-rf1', 'cairn-rf2'))
    q1 = r1 / t if (t and r1 is not None) else None
    q2 = r2 / t if (t and r2 is not None) else None
    if q1 is None or q2 is None:
        met, missing = 'n/a (missing cell)', True
    else:
        ok = q1 >= 1.5 and q2 >= 1.0
        met = 'yes' if ok else 'no' + (' (rf1)' if q1 < 1.5 else '') + (' (rf2)' if q2 < 1.0 else '')
    met_all = met_all and met == 'yes'
    print(fmt % (row, cell(f), cell(t), cell(r1), '-' if q1 is None else '%.2f' % q1,
                 cell(r2), '-' if q2 is None else '%.2f' % q2, met))
print()
print('# all rows meet the targets: %s%s' % ('yes' if met_all else 'no', ' (some cells missing)' if missing else ''))
print('# qemu-img rows: tgt = the "iscsi" target of run-block-peers.sh; fio rows: IOPS, best of REPS')
EOF
    echo
    echo "# raw: run-block-peers.sh"
    cat "$BLOCK"
    echo "# raw: fio"
    cat "$FIOOUT"
} >"$OUT/latest.txt"
sed -n '1,/^# qemu-img rows: tgt/p' "$OUT/latest.txt"
log "results in $OUT/latest.txt"
