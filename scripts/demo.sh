#!/usr/bin/env bash
# Builds Cairn and starts the local 3-node demo cluster (127.0.0.1-3) with
# embedded defaults. Ctrl-C stops it; running it again restarts the same
# cluster from ./cairn-demo (delete that folder for a fresh one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
exec cargo run -p cairn -- demo --root "${CAIRN_DEMO_ROOT:-cairn-demo}" "$@"
