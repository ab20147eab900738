#!/usr/bin/env bash
# Builds Cairn and starts the local 3-node demo cluster (127.0.0.1-3) with
# embedded defaults. Ctrl-C stops it; running it again restarts the same
# cluster from ./cairn-demo (delete that folder for a fresh one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
# Same package selection as scripts/test.sh, so both share one build of every
# dependency (a subset would resolve features differently and rebuild RocksDB).
cargo build --workspace --all-targets
exec "$CARGO_TARGET_DIR/debug/cairn" demo --root "${CAIRN_DEMO_ROOT:-cairn-demo}" "$@"
