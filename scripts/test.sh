#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and the end-to-end and
# fault tests that start real cairn processes (network namespaces need root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-0}"
start=$(date +%s)
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo build"
cargo build --workspace --all-targets
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
# The power-loss tests serve a node's folder through FUSE (cairn-lazyfs).
[[ -e /dev/fuse ]] || modprobe fuse 2>/dev/null || echo "warning: no /dev/fuse; the power-loss tests will fail"
echo "== cargo test"
cargo test --workspace -- --test-threads=2
echo "== test suite finished in $(( $(date +%s) - start ))s"
