# Shared by the benchmark scripts: a 3-node Cairn cluster on loopback.
# Sourced, not run. Expects from the caller: CAIRN (the binary), WORK (a
# scratch folder), CAIRN_IPS (3 addresses), CAIRN_RPC_PORT, CAIRN_API_PORT,
# OUT, the PIDS array (stopped by the caller's exit trap), and the log, die
# and alive functions. Sets CDIRS, CPIDS, C1 and SEED.
# wait_lun_writable needs qemu-io (qemu-utils).
# Optional: CAIRN_ISCSI_PORT (each node's iSCSI portal is its address and this
# port; unset: the CLI's default, port 3260 on the RPC address).

voters_of() {
    if command -v jq >/dev/null; then
        jq '.voters | length'
    else
        python3 -c 'import json,sys; print(len(json.load(sys.stdin)["voters"]))'
    fi
}

# --- Cairn: init node 1, join 2 and 3 ----------------------------------------
CDIRS=()
CPIDS=()
start_cairn() { # index
    local d=${CDIRS[$1]}
    "$CAIRN" node run --config "$d/cairn.toml" >"$d/node.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    CPIDS+=("$pid")
    log "cairn node $(($1 + 1)) pid $pid on ${CAIRN_IPS[$1]}"
}
check_cairn_alive() {
    local i
    for i in "${!CPIDS[@]}"; do
        alive "${CPIDS[$i]}" || {
            tail -n 30 "${CDIRS[$i]}/node.log" >&2 || true
            die "cairn node $((i + 1)) exited; log above"
        }
    done
}

iscsi_args() { # index -> the --iscsi-addr argument, if CAIRN_ISCSI_PORT is set
    [[ -n ${CAIRN_ISCSI_PORT:-} ]] && echo "--iscsi-addr=${CAIRN_IPS[$1]}:$CAIRN_ISCSI_PORT"
    return 0
}

start_cairn_cluster() { # cluster name
    local i voters
    for i in 0 1 2; do
        CDIRS+=("$WORK/cairn/n$((i + 1))")
        mkdir -p "${CDIRS[$i]}"
    done
    C1=${CDIRS[0]}
    SEED=${CAIRN_IPS[0]}:$CAIRN_API_PORT
    "$CAIRN" --data-dir "$C1" cluster init --name "$1" \
        --rpc-addr "${CAIRN_IPS[0]}:$CAIRN_RPC_PORT" --api-addr "$SEED" $(iscsi_args 0) >/dev/null
    start_cairn 0
    for _ in $(seq 1 300); do
        check_cairn_alive
        "$CAIRN" --data-dir "$C1" -o json cluster status >/dev/null 2>&1 && break
        sleep 0.2
    done
    "$CAIRN" --data-dir "$C1" -o json cluster status >/dev/null || die "cairn node 1 did not come up"
    for i in 1 2; do
        "$CAIRN" --data-dir "${CDIRS[$i]}" --token "$(cat "$C1/admin.token")" --ca "$C1/tls/ca.pem" \
            cluster join --seed "$SEED" \
            --rpc-addr "${CAIRN_IPS[$i]}:$CAIRN_RPC_PORT" --api-addr "${CAIRN_IPS[$i]}:$CAIRN_API_PORT" \
            $(iscsi_args "$i") >/dev/null
        start_cairn "$i"
    done
    voters=0
    for _ in $(seq 1 600); do
        check_cairn_alive
        voters=$("$CAIRN" --data-dir "$C1" -o json cluster status 2>/dev/null | voters_of 2>/dev/null || echo 0)
        [[ $voters == 3 ]] && break
        sleep 0.3
    done
    [[ $voters == 3 ]] || die "the Cairn cluster did not reach 3 voters (has $voters); logs in $OUT/logs"
    log "cairn: 3 voters"
}

# --- a LUN that takes writes ------------------------------------------------
wait_lun_writable() { # iscsi URL [file for the client's errors]
    # Returns once the LUN takes a 1 MiB write at offset 0 (its vdisk's
    # replicas are placed once the nodes' disks are registered); dies after
    # 90 tries, or as soon as a node started here has exited.
    local _
    for _ in $(seq 1 90); do
        check_cairn_alive
        timeout 30 qemu-io -f raw -c "write -P 0x5a 0 1M" "$1" >/dev/null 2>>"${2:-/dev/null}" && return 0
        sleep 1
    done
    die "$1 does not take writes (see the nodes' logs)"
}
