#!/usr/bin/env bash
# A/B of two or more Cairn builds on one held 3-node cluster, for changes
# whose effect is smaller than the run-to-run spread of benches/iscsi/run.sh
# (single QD1 cells move ±15 % between runs on the 2-vCPU test VM).
#
#   benches/iscsi/ab.sh /path/to/cairn-a /path/to/cairn-b [...]
#
# One cluster (RF1 and RF2 datastores, a 1 GiB vdisk each, owned by node 1)
# is created with the first binary. Each round restarts the three nodes with
# each binary in turn (the order alternates between rounds), then warms every
# extent group before measuring: the first write to a group after a restart
# takes it over (a raft proposal and an epoch raise on every replica, ~2 ms),
# which made unwarmed QD1 cells read a third of their real rate.
# A build's label is the name of the folder holding its binary.
#
# Prints every cell as it runs, then per cell and build: mean and median
# IOPS, the rounds in which that build beat the first one, and CPU time of
# all three nodes per I/O (from /proc, user + system).
#
# Environment: ROUNDS (default 5), CELLS (default all of: r1rf1 w1rf1 w1rf2
# r32rf1 w32rf1 w32rf2 sw32rf1 sw32rf2), OUT (results file, default
# /tmp/cairn-ab.<pid>.txt), ports as in run.sh's defaults otherwise.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
(($# >= 2)) || {
    echo "usage: $0 cairn-binary-a cairn-binary-b [more binaries]" >&2
    exit 2
}
BINS=()
for b in "$@"; do
    [[ -x $b ]] || {
        echo "not an executable: $b" >&2
        exit 2
    }
    BINS+=("$(cd "$(dirname "$b")" && pwd)/$(basename "$b")")
done
ROUNDS=${ROUNDS:-5}
CELLS=${CELLS:-r1rf1 w1rf1 w1rf2 r32rf1 w32rf1 w32rf2 sw32rf1 sw32rf2}
OUT=${OUT:-/tmp/cairn-ab.$$.txt}
WORK=$(mktemp -d /tmp/cairn-ab.XXXXXX)
CAIRN_IPS=(127.0.0.1 127.0.0.2 127.0.0.3)
CAIRN_RPC_PORT=${CAIRN_RPC_PORT:-17450}
CAIRN_API_PORT=${CAIRN_API_PORT:-18793}
CAIRN_ISCSI_PORT=${CAIRN_ISCSI_PORT:-13410}
PIDS=()
log() { echo "[ab $(date +%T)] $*" >&2; }
die() {
    log "$*"
    exit 1
}
alive() { kill -0 "$1" 2>/dev/null; }
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 1
    rm -rf "$WORK"
}
trap cleanup EXIT
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || die "needs qemu-img and qemu-io (qemu-utils)"

CAIRN=${BINS[0]}
# shellcheck source=../lib/cairn-cluster.sh
source "$HERE/../lib/cairn-cluster.sh"
start_cairn_cluster ab
for rf in 1 2; do
    "$CAIRN" --data-dir "$C1" -o json datastore create "ab$rf" --rf "$rf" >/dev/null
    "$CAIRN" --data-dir "$C1" -o json vdisk create --datastore "ab$rf" "v$rf" --size 1G --owner 1 >/dev/null
    "$CAIRN" --data-dir "$C1" iscsi target create "iqn.2026-11.io.cairn:ab$rf" --lun "0=ab$rf/v$rf" >/dev/null
done
U1=iscsi://127.0.0.1:$CAIRN_ISCSI_PORT/iqn.2026-11.io.cairn:ab1/0
U2=iscsi://127.0.0.1:$CAIRN_ISCSI_PORT/iqn.2026-11.io.cairn:ab2/0
# The strided "random" pattern of the peers' bench-block.sh for 1 GiB:
# qemu-img wraps offsets modulo the size less one block (262,143 blocks),
# and a step of ~0.618 of that, prime to it, visits every block.
STEP_B=$((162014 * 4096))

restart() { # binary
    local p i
    for p in "${CPIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${CPIDS[@]}"; do while alive "$p"; do sleep 0.1; done; done
    CPIDS=()
    CAIRN=$1
    for i in 0 1 2; do start_cairn "$i"; done
    wait_lun_writable "$U1"
    wait_lun_writable "$U2"
}
cpu() { # user + system ticks of the three nodes
    local t=0 p
    for p in "${CPIDS[@]}"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
    echo "$t"
}
bench() { # url count args...
    local url=$1 count=$2
    shift 2
    timeout 120 qemu-img bench -f raw -t none -i threads "$@" -c "$count" "$url" 2>&1 |
        sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p'
}
warm() {
    local u
    for u in "$U1" "$U2"; do
        bench "$u" 1024 -w -d 32 -s 1M >/dev/null
        # 4 KiB writes over every group: what the cells below write to.
        bench "$u" 8192 -w -d 32 -s 4k -S $STEP_B >/dev/null
    done
}
cell() { # round label build
    local url count args secs c0 c1 hz
    case $2 in
    r1rf1) url=$U1 count=15000 args="-d 1 -s 4k -S $STEP_B" ;;
    w1rf1) url=$U1 count=10000 args="-w -d 1 -s 4k -S $STEP_B" ;;
    w1rf2) url=$U2 count=5000 args="-w -d 1 -s 4k -S $STEP_B" ;;
    r32rf1) url=$U1 count=100000 args="-d 32 -s 4k -S $STEP_B" ;;
    w32rf1) url=$U1 count=60000 args="-w -d 32 -s 4k -S $STEP_B" ;;
    w32rf2) url=$U2 count=40000 args="-w -d 32 -s 4k -S $STEP_B" ;;
    sw32rf1) url=$U1 count=2048 args="-w -d 32 -s 1M" ;;
    sw32rf2) url=$U2 count=2048 args="-w -d 32 -s 1M" ;;
    *) die "unknown cell $2" ;;
    esac
    hz=$(getconf CLK_TCK)
    c0=$(cpu)
    # shellcheck disable=SC2086 # args are words
    secs=$(bench "$url" "$count" $args)
    c1=$(cpu)
    [[ -n $secs ]] || die "cell $2 of $3 gave no result"
    python3 -c 'import sys; r,l,b,n,s,c0,c1,hz=sys.argv[1:]; n=int(n)
print(r, l, b, round(n/float(s)), round((int(c1)-int(c0))*1e6/int(hz)/n))' \
        "$1" "$2" "$3" "$count" "$secs" "$c0" "$c1" "$hz" | tee -a "$OUT"
}

: >"$OUT"
log "results in $OUT (round cell build iops cpu_us_per_io)"
for r in $(seq 1 "$ROUNDS"); do
    order=("${BINS[@]}")
    if ((r % 2 == 0)); then
        # Reverse the order: whichever build runs first in a round is not
        # always the same one.
        order=()
        for ((i = ${#BINS[@]} - 1; i >= 0; i--)); do order+=("${BINS[$i]}"); done
    fi
    for b in "${order[@]}"; do
        restart "$b"
        warm
        for c in $CELLS; do cell "$r" "$c" "$(basename "$(dirname "$b")")"; done
    done
done

python3 - "$OUT" "$(basename "$(dirname "${BINS[0]}")")" <<'EOF'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
base = sys.argv[2]
data = {}
for r, cell, build, iops, cpu in rows:
    data.setdefault((cell, build), {})[int(r)] = (int(iops), int(cpu))
builds = list(dict.fromkeys(b for _, _, b, _, _ in rows))
cells = list(dict.fromkeys(c for _, c, _, _, _ in rows))
print(f"{'cell':<9} {'build':<12} {'mean':>8} {'median':>8} {'vs ' + base:>9} {'rounds won':>10} {'cpu µs/io':>9}")
for c in cells:
    ref = data.get((c, base), {})
    for b in builds:
        d = data.get((c, b), {})
        iops = [v[0] for v in d.values()]
        cpus = [v[1] for v in d.values()]
        ratio = st.mean(iops) / st.mean(ref[k][0] for k in ref) if ref else float("nan")
        won = "" if b == base else f"{sum(1 for k in d if k in ref and d[k][0] > ref[k][0])}/{len(d)}"
        print(f"{c:<9} {b:<12} {st.mean(iops):>8.0f} {st.median(iops):>8.0f} {ratio:>9.3f} {won:>10} {st.mean(cpus):>9.0f}")
EOF
