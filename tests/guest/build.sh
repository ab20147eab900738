#!/usr/bin/env bash
# build.sh — builds the tiny test guest (a Debian kernel + a busybox initramfs
# whose /init is tests/guest/init) into OUTDIR. Idempotent: the downloaded
# packages and the result are cached there, and nothing is rebuilt unless the
# package versions, init or this script change.
#   usage: tests/guest/build.sh [OUTDIR]   (default $HOME/.cache/cairn-guest)
#   env:   KERNEL_PKG (default: what linux-image-amd64 depends on, e.g.
#          linux-image-6.1.0-56-amd64)  BUSYBOX_PKG (busybox-static)
#          REFRESH=1: also rebuild when apt now has newer packages (otherwise a
#          cached guest is used as long as init and this script are unchanged,
#          without asking apt anything)
# Prints OUTDIR/vmlinuz and OUTDIR/initramfs.gz on success.
#
# Nothing is installed system-wide: the two .deb files are fetched with
# `apt-get download` and unpacked with `dpkg-deb -x` under OUTDIR (installing
# a kernel package would run boot-loader hooks on the build host). Needs apt's
# package lists (run `apt-get update` once on a fresh machine), dpkg-deb and
# gzip; busybox's own depmod and cpio (from the unpacked package) do the rest.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUTDIR=${1:-$HOME/.cache/cairn-guest}
BUSYBOX_PKG=${BUSYBOX_PKG:-busybox-static}
log() { printf '[guest-build] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Modules the guest needs (their dependencies are added from modules.dep):
# virtio-blk disks (/dev/vda) and virtio-scsi disks (/dev/sda, BUS=scsi in run.sh).
WANT_MODULES=(virtio_pci virtio_blk virtio_scsi sd_mod)

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOCAL="init=$(sha256sum "$HERE/init" | cut -c1-16) build=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
if [[ ${REFRESH:-0} != 1 && -z ${KERNEL_PKG:-} && -f $OUTDIR/stamp && -f $OUTDIR/vmlinuz && -f $OUTDIR/initramfs.gz ]] &&
    [[ $(cat "$OUTDIR/stamp") == *" $LOCAL" ]]; then
    echo "$OUTDIR/vmlinuz"
    echo "$OUTDIR/initramfs.gz"
    exit 0
fi

if [[ -z ${KERNEL_PKG:-} ]]; then
    KERNEL_PKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n 1)
    [[ -n $KERNEL_PKG ]] || die "cannot resolve linux-image-amd64 (run apt-get update?)"
fi
kver_pkg() { apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p'; }
KERNEL_VER=$(kver_pkg "$KERNEL_PKG")
BUSYBOX_VER=$(kver_pkg "$BUSYBOX_PKG")
[[ -n $KERNEL_VER && $KERNEL_VER != "(none)" ]] || die "no candidate for $KERNEL_PKG"
[[ -n $BUSYBOX_VER && $BUSYBOX_VER != "(none)" ]] || die "no candidate for $BUSYBOX_PKG"

STAMP="kernel=$KERNEL_PKG/$KERNEL_VER busybox=$BUSYBOX_PKG/$BUSYBOX_VER $LOCAL"
if [[ -f $OUTDIR/stamp && $(cat "$OUTDIR/stamp") == "$STAMP" && -f $OUTDIR/vmlinuz && -f $OUTDIR/initramfs.gz ]]; then
    echo "$OUTDIR/vmlinuz"
    echo "$OUTDIR/initramfs.gz"
    exit 0
fi
log "building the guest into $OUTDIR ($STAMP)"

# --- fetch and unpack (cached per version) ---------------------------------------
fetch() { # package version -> path of the .deb in OUTDIR/debs
    local pkg=$1 ver=$2 deb
    mkdir -p "$OUTDIR/debs"
    deb=$(find "$OUTDIR/debs" -maxdepth 1 -name "${pkg}_*.deb" | while read -r f; do
        [[ $(dpkg-deb -f "$f" Version) == "$ver" ]] && echo "$f"; done | head -n 1)
    if [[ -z $deb ]]; then
        log "downloading $pkg $ver"
        # (as root, apt would try to drop to the _apt user, who cannot write here)
        (cd "$OUTDIR/debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >&2) || die "apt-get download $pkg=$ver failed"
        deb=$(find "$OUTDIR/debs" -maxdepth 1 -name "${pkg}_*.deb" | while read -r f; do
            [[ $(dpkg-deb -f "$f" Version) == "$ver" ]] && echo "$f"; done | head -n 1)
        [[ -n $deb ]] || die "downloaded $pkg but cannot find the .deb"
    fi
    echo "$deb"
}
KDEB=$(fetch "$KERNEL_PKG" "$KERNEL_VER")
BDEB=$(fetch "$BUSYBOX_PKG" "$BUSYBOX_VER")

ROOTX=$OUTDIR/unpacked
rm -rf "$ROOTX" "$OUTDIR/initramfs.tmp"
mkdir -p "$ROOTX/kernel" "$ROOTX/busybox"
dpkg-deb -x "$KDEB" "$ROOTX/kernel"
dpkg-deb -x "$BDEB" "$ROOTX/busybox"
BB=$ROOTX/busybox/bin/busybox
[[ -x $BB ]] || die "no bin/busybox in $BDEB"
KVER=$(basename "$(ls -d "$ROOTX"/kernel/lib/modules/*/ | head -n 1)")
VMLINUZ=$ROOTX/kernel/boot/vmlinuz-$KVER
[[ -f $VMLINUZ ]] || die "no $VMLINUZ in $KDEB"
MODDIR=$ROOTX/kernel/lib/modules/$KVER
# The package has no modules.dep (the postinst makes it); busybox's depmod
# writes one for the unpacked tree.
"$BB" depmod -b "$ROOTX/kernel" "$KVER"

# --- resolve module load order ------------------------------------------------------
# modules.dep lists each module's full dependency closure, deepest last; load
# them in reverse, each module once.
declare -A LOADED
ORDER=()
add_module() { # name
    local name=${1//-/_} line path deps d i
    line=$(awk -v n="$name" '{ f = $1; sub(/:$/, "", f); b = f; sub(/.*\//, "", b); sub(/\.ko(\.[a-z]+)?$/, "", b); gsub(/-/, "_", b); if (b == n) { print; exit } }' "$MODDIR/modules.dep")
    if [[ -z $line ]]; then
        grep -qE "/${1}\.ko|/${name}\.ko" "$MODDIR/modules.builtin" && return 0
        die "module $1 is neither in modules.dep nor built in"
    fi
    path=${line%%:*}
    read -r -a deps <<<"${line#*:}"
    for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
        d=${deps[$i]}
        [[ -n ${LOADED[$d]:-} ]] && continue
        LOADED[$d]=1
        ORDER+=("$d")
    done
    [[ -n ${LOADED[$path]:-} ]] && return 0
    LOADED[$path]=1
    ORDER+=("$path")
}
for m in "${WANT_MODULES[@]}"; do add_module "$m"; done

# --- initramfs -------------------------------------------------------------------------
STAGE=$OUTDIR/initramfs.tmp
mkdir -p "$STAGE"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$BB" "$STAGE/bin/busybox"
for app in $("$BB" --list); do
    [[ $app == busybox ]] || ln -s busybox "$STAGE/bin/$app"
done
: >"$STAGE/lib/modules/load-order"
for p in "${ORDER[@]}"; do
    cp "$MODDIR/$p" "$STAGE/lib/modules/"
    basename "$p" >>"$STAGE/lib/modules/load-order"
done
install -m 0755 "$HERE/init" "$STAGE/init"
echo "$STAMP" >"$STAGE/guest-stamp"
# /dev/console comes from the kernel's built-in initramfs; /init remounts /dev as devtmpfs.
(cd "$STAGE" && find . | sort | "$BB" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -9 >"$OUTDIR/initramfs.gz.tmp"
cp "$VMLINUZ" "$OUTDIR/vmlinuz.tmp"
mv "$OUTDIR/initramfs.gz.tmp" "$OUTDIR/initramfs.gz"
mv "$OUTDIR/vmlinuz.tmp" "$OUTDIR/vmlinuz"
rm -rf "$STAGE" "$ROOTX"
echo "$STAMP" >"$OUTDIR/stamp"
log "kernel $KVER, modules: $(tr '\n' ' ' <<<"$(printf '%s\n' "${ORDER[@]##*/}")")"
log "initramfs $(stat -c %s "$OUTDIR/initramfs.gz") bytes"
echo "$OUTDIR/vmlinuz"
echo "$OUTDIR/initramfs.gz"
