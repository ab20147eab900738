#!/usr/bin/env bash
# Installs the Debian packages Cairn's build, demo and tests need, if missing.
# Idempotent: does nothing (not even apt-get update) when all are present.
#   clang, libclang-dev  bindgen for librocksdb-sys
#   protobuf-compiler    raft-proto and tonic-build
#   etcd-server          peer of the metadata benchmark
#   nftables, iptables, iproute2  network-namespace partition tests
#   libiscsi-bin, libiscsi7  iscsi-test-cu, iscsi-ls, iscsi-inq (iSCSI tests)
#   tgt                  peer of the iSCSI benchmark
#   libpmemblk1          a shared library ../shared/peers/bin/fio (fio with the
#                        libiscsi engine, used by benches/iscsi) is linked against
#   qemu-utils, qemu-block-extra, qemu-system-x86 from bookworm: the iscsi://
#     driver exists only for QEMU 7.2 and must match qemu-img's version exactly
#     (installing qemu-block-extra alone would remove a newer qemu-img)
set -euo pipefail
packages=(clang libclang-dev protobuf-compiler etcd-server nftables iptables iproute2
  libiscsi-bin libiscsi7 tgt libpmemblk1)
qemu=(qemu-utils qemu-block-extra qemu-system-x86)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
qemu_ok=1
for p in "${qemu[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || qemu_ok=0
done
# Also reinstall when qemu-img and the block drivers disagree on the version.
if ((qemu_ok)); then
  v1=$(dpkg-query -W -f='${Version}' qemu-utils)
  v2=$(dpkg-query -W -f='${Version}' qemu-block-extra)
  [[ $v1 == "$v2" ]] || qemu_ok=0
fi
((${#missing[@]})) || ((!qemu_ok)) || exit 0
sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
if ((${#missing[@]})); then
  echo "== installing Debian packages: ${missing[*]}"
  $sudo apt-get install -y -qq "${missing[@]}"
fi
if ((!qemu_ok)); then
  echo "== installing QEMU 7.2 (qemu-img, iscsi:// driver, system emulator) from bookworm"
  $sudo apt-get install -y -qq --allow-downgrades "${qemu[@]/%//bookworm}"
fi
