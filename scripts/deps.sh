#!/usr/bin/env bash
# Installs the Debian packages Cairn's build, demo and tests need, if missing.
# Idempotent: does nothing (not even apt-get update) when all are present.
#   clang, libclang-dev  bindgen for librocksdb-sys
#   protobuf-compiler    raft-proto and tonic-build
#   etcd-server          peer of the metadata benchmark
#   nftables, iptables, iproute2  network-namespace partition tests
set -euo pipefail
packages=(clang libclang-dev protobuf-compiler etcd-server nftables iptables iproute2)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0
echo "== installing Debian packages: ${missing[*]}"
sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq "${missing[@]}"
