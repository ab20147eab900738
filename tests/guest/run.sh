#!/usr/bin/env bash
# run.sh — boots the test guest (tests/guest/build.sh) under QEMU with its only
# disk on URL, and reports what the guest's /init printed.
#   usage: tests/guest/run.sh URL write|read|stress TOKEN [MB|SECONDS]
#     write  TOKEN [MB]: writes the token block and MB MiB (16) of pattern, reads it
#            all back; exit 0 on "CAIRN-GUEST: OK".
#     read   TOKEN [-]: reads the token block and verifies the pattern it records;
#            prints the token on stdout; exit 0 if it equals TOKEN (TOKEN "-": any).
#     stress TOKEN [SECONDS]: rewrites and verifies an 8 MiB region (STRESS_MB) for
#            SECONDS (30), printing "CAIRN-GUEST: PROGRESS" lines; exit 0 on OK.
#   URL: anything QEMU's -drive file= takes: iscsi://[user%pass@]host[:port]/IQN/LUN,
#        a plain file, nbd://...
#   env: GUEST_DIR (cache of build.sh; $HOME/.cache/cairn-guest) INITIATOR
#        (iqn.2026-11.io.cairn:guest) CHAP_USER/CHAP_PASSWORD (one-way CHAP)
#        HEADER_DIGEST (NONE|CRC32C|CRC32C-NONE|NONE-CRC32C) BUS (virtio | scsi:
#        virtio-scsi-pci + scsi-hd) ACCEL (tcg; kvm works where /dev/kvm does)
#        MEM (256) TIMEOUT (seconds for the whole run; 300 + SECONDS)
#        LOG (serial console copy; default a temp file, removed on success)
#        PIDFILE (QEMU writes its PID there: for fault tests) QUIET=1 (no console echo)
#        QEMU_EXTRA (more QEMU arguments, word-split)
# The console is echoed to stderr; the result line and (read mode) the token go to stdout.
# Exit: 0 OK; 1 the guest printed FAIL or nothing conclusive; 2 usage; 3 QEMU quit
# before the guest found its disk (e.g. login refused: wrong CHAP secret, initiator
# not allowed); 124 timeout.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# -ge 3 ]] || { sed -n '2,25p' "$0" >&2; exit 2; }
URL=$1 MODE=$2 TOKEN=$3 ARG=${4:-}
GUEST_DIR=${GUEST_DIR:-$HOME/.cache/cairn-guest}
INITIATOR=${INITIATOR:-iqn.2026-11.io.cairn:guest}
BUS=${BUS:-virtio}
ACCEL=${ACCEL:-tcg}
MEM=${MEM:-256}
STRESS_MB=${STRESS_MB:-8}

append="console=ttyS0 panic=-1 quiet cairn.mode=$MODE"
case $MODE in
write)
    append+=" cairn.token=$TOKEN cairn.mb=${ARG:-16}"
    TIMEOUT=${TIMEOUT:-300}
    ;;
read)
    TIMEOUT=${TIMEOUT:-300}
    ;;
stress)
    append+=" cairn.token=$TOKEN cairn.mb=$STRESS_MB cairn.secs=${ARG:-30}"
    TIMEOUT=${TIMEOUT:-$((300 + ${ARG:-30}))}
    ;;
*) echo "run.sh: unknown mode '$MODE' (write|read|stress)" >&2; exit 2 ;;
esac
[[ $MODE == read || $TOKEN =~ ^[A-Za-z0-9._:-]{1,200}$ ]] ||
    { echo "run.sh: the token must match [A-Za-z0-9._:-]{1,200}" >&2; exit 2; }

mapfile -t built < <("$HERE/build.sh" "$GUEST_DIR")
KERNEL=${built[0]:-} INITRD=${built[1]:-}
[[ -f $KERNEL && -f $INITRD ]] || { echo "run.sh: tests/guest/build.sh $GUEST_DIR failed" >&2; exit 1; }

opts=(format=raw cache=none werror=report rerror=report)
case $BUS in
virtio) drive=(-drive "file=${URL//,/,,},if=virtio,$(IFS=,; echo "${opts[*]}")") ;;
scsi) drive=(-device virtio-scsi-pci,id=scsi0
    -drive "file=${URL//,/,,},if=none,id=d0,$(IFS=,; echo "${opts[*]}")"
    -device scsi-hd,drive=d0,bus=scsi0.0) ;;
*) echo "run.sh: BUS must be virtio or scsi" >&2; exit 2 ;;
esac
own_log=0
if [[ -z ${LOG:-} ]]; then LOG=$(mktemp "${TMPDIR:-/tmp}/cairn-guest.XXXXXX.log"); own_log=1; fi
: >"$LOG"
# QEMU option values escape ',' as ',,'. The CHAP secret goes through a 0600
# file (a QEMU secret object), not the command line (ps, the log).
iscsi="initiator-name=${INITIATOR//,/,,}"
secret=()
if [[ -n ${CHAP_USER:-} ]]; then
    (umask 077 && printf '%s' "${CHAP_PASSWORD:-}" >"$LOG.secret")
    secret=(-object "secret,id=chap0,file=${LOG//,/,,}.secret")
    iscsi+=",user=${CHAP_USER//,/,,},password-secret=chap0"
fi
[[ -n ${HEADER_DIGEST:-} ]] && iscsi+=",header-digest=$HEADER_DIGEST"
cmd=(qemu-system-x86_64 -accel "$ACCEL" -m "$MEM" -smp 1 -nographic -no-reboot -nodefaults
    -serial stdio -monitor none
    -kernel "$KERNEL" -initrd "$INITRD" -append "$append"
    "${secret[@]}" -iscsi "$iscsi" "${drive[@]}")
# QEMU's PID: for fault tests (PIDFILE) and to stop it if this script is stopped.
PIDFILE=${PIDFILE:-$LOG.pid}
rm -f "$PIDFILE"
cmd+=(-pidfile "$PIDFILE")
stop_qemu() {
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null) || return 0
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == qemu-system-* ]] && kill "$pid" 2>/dev/null
    return 0
}
trap 'stop_qemu; exit 143' TERM
trap 'stop_qemu; exit 130' INT
trap 'stop_qemu; rm -f "$LOG.secret"' EXIT
# shellcheck disable=SC2206
[[ -n ${QEMU_EXTRA:-} ]] && cmd+=($QEMU_EXTRA)
echo "# ${cmd[*]}" >>"$LOG"
t0=$(date +%s.%N)
# In the background plus wait, so that a TERM or INT to this script stops QEMU at once.
if [[ ${QUIET:-0} == 1 ]]; then
    timeout --foreground -k 10 "$TIMEOUT" "${cmd[@]}" </dev/null >>"$LOG" 2>&1 &
else
    timeout --foreground -k 10 "$TIMEOUT" "${cmd[@]}" </dev/null > >(tee -a "$LOG" >&2) 2>&1 &
fi
qpid=$!
set +e
wait "$qpid"
rc=$?
set -e
secs=$(echo "$(date +%s.%N) - $t0" | bc)
tr -d '\r' <"$LOG" >"$LOG.tmp" && mv "$LOG.tmp" "$LOG"
result=$(grep -aoE 'CAIRN-GUEST: (OK|FAIL|TOKEN) .*' "$LOG" | tail -n 1 || true)
printf '# qemu exit %s after %.1f s; console log %s\n' "$rc" "$secs" "$LOG" >&2
if [[ $rc == 124 || $rc == 137 ]] && [[ -z $result ]]; then
    echo "CAIRN-GUEST: FAIL timeout after ${TIMEOUT}s (no result line)"
    exit 124
fi
if [[ -z $result ]]; then
    why=$(grep -a '^qemu-system-x86_64: ' "$LOG" | tail -n 1 || true)
    echo "CAIRN-GUEST: FAIL no result line (qemu exit $rc; log $LOG)${why:+: $why}"
    # QEMU stopped before the guest ran: the disk did not open (login refused...).
    grep -aq 'CAIRN-GUEST: READY' "$LOG" || exit 3
    exit 1
fi
echo "$result"
case $result in
"CAIRN-GUEST: OK "*) ;;
"CAIRN-GUEST: TOKEN "*)
    got=$(awk '{print $3}' <<<"$result")
    echo "$got"
    [[ $MODE == read && ( $TOKEN == - || $got == "$TOKEN" ) ]] ||
        { echo "run.sh: token '$got' is not the expected '$TOKEN'" >&2; exit 1; }
    ;;
*) exit 1 ;;
esac
# An OK of another mode or token (say, a stale disk) is not a success.
case $MODE in
write) [[ $result == "CAIRN-GUEST: OK wrote token $TOKEN "* ]] || { echo "run.sh: unexpected result for write" >&2; exit 1; } ;;
stress) [[ $result == "CAIRN-GUEST: OK stress token $TOKEN "* ]] || { echo "run.sh: unexpected result for stress" >&2; exit 1; } ;;
esac
[[ $own_log == 1 ]] && rm -f "$LOG" "$LOG.pid"
exit 0
