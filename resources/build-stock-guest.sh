#!/usr/bin/env bash
# Build a stock-distribution guest: Debian's linux-image-cloud-amd64 kernel exactly as
# Debian ships it (vmlinuz, a bzImage) and a small initramfs whose /init (busybox-static)
# loads the virtio_mmio, virtio_blk, virtio_net and virtio_console modules from the same
# package (with their dependencies, from modules.dep) and mounts /dev/vda. rvmm describes
# its virtio-mmio devices to such a kernel through ACPI, so no command-line hints are needed:
#   rvmm --kernel DIR/vmlinuz --initrd DIR/initramfs.cpio --rootfs disk.ext4
#
# Inputs: this script, lib.sh, the version of the kernel image package the metapackage
# points at, busybox-static. Nothing is installed: the package is fetched with
# `apt-get download` (so only from the configured apt sources).
# Output: ${XDG_CACHE_HOME:-$HOME/.cache}/rvmm/stock-<key>/{vmlinuz,vmlinux,initramfs.cpio,
# modules.load,kernel-version}, where vmlinux is the ELF kernel inside vmlinuz, decompressed
# here (the same code; on an emulating KVM the guest-side decompressor takes minutes); ${XDG_CACHE_HOME:-$HOME/.cache}/rvmm/stock links to the
# newest. stdout carries only that directory; progress goes to stderr.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: build-stock-guest.sh [--print-dir] [--force]

Fetches Debian's cloud kernel, builds an initramfs that loads its virtio modules and
mounts /dev/vda, and prints the directory that holds them.

  --print-dir   print where the artifacts are (or would be) and exit
  --force       rebuild even if the artifacts are already complete
  -h, --help    show this help
EOF
}

name=stock
# shellcheck source=lib.sh
source "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
# shellcheck source=debian-kernel.sh
source "$resources/debian-kernel.sh"
parse_build_args "$@"

meta=linux-image-cloud-amd64
busybox=/bin/busybox
# What the initramfs loads, in this order; their dependencies come first.
wanted=(virtio_mmio virtio_blk virtio_net virtio_console ext4)

for tool in apt-cache apt-get dpkg-deb depmod cpio; do
    command -v "$tool" >/dev/null || die "$tool not found: this script expects Debian 12"
done
busybox_version=$(pkg_version busybox-static)
[[ -n $busybox_version && -x $busybox ]] || die "$busybox missing: install package busybox-static"

# The modules must come from the very package the metapackage points at.
resolve_kernel_package "$meta"

# extract_vmlinux BZIMAGE OUT: the compressed payload of a bzImage (boot protocol 2.08+:
# payload_offset/payload_length after the setup sectors), decompressed by the tool its magic
# names. The payload ends with the 4-byte uncompressed size, which no decompressor expects.
extract_vmlinux() {
    local image=$1 out=$2 setup_sects offset length magic
    u32() { od -An -tu4 -j "$1" -N4 -- "$image" | tr -d ' '; }
    setup_sects=$(od -An -tu1 -j 0x1f1 -N1 -- "$image" | tr -d ' ')
    ((setup_sects)) || setup_sects=4
    offset=$(((setup_sects + 1) * 512 + $(u32 0x248)))
    length=$(($(u32 0x24c) - 4))
    magic=$(od -An -tx1 -j "$offset" -N4 -- "$image" | tr -d ' ')
    local unpack
    case $magic in
        02214c18) unpack="lz4 -dc" ;;
        1f8b*) unpack="gzip -dc" ;;
        fd377a58) unpack="xz -dc" ;;
        28b52ffd) unpack="zstd -qdc" ;;
        *) die "$image: unknown payload compression (magic $magic)" ;;
    esac
    dd if="$image" bs=64K iflag=skip_bytes,count_bytes skip="$offset" count="$length" \
        status=none | $unpack >"$out" ||
        die "$image: cannot decompress its payload with $unpack"
    [[ $(od -An -tx1 -N4 -- "$out" | tr -d ' ') == 7f454c46 ]] ||
        die "$image: its payload is not an ELF kernel"
}

key=$(input_key "$image_pkg $image_version busybox-static $busybox_version" \
    build-stock-guest.sh debian-kernel.sh)
cache_setup "$key"
step "building $name-$key ($image_pkg $image_version)"

step "1/3 apt-get download $image_pkg=$image_version"
fetch_kernel_package "$work"
moddir=$work/pkg/lib/modules/$kver
extract_vmlinux "$out/vmlinuz" "$out/vmlinux"

step "2/3 resolving ${wanted[*]} in modules.dep"
# modules.dep: "path/mod.ko[.xz]: dep1 dep2 ...", each line listing every (transitive)
# dependency, the ones to load last first. A module not listed there but in
# modules.builtin is part of the kernel image and needs no loading.
order=()
add_module() {
    local path=$1 seen
    for seen in "${order[@]}"; do
        [[ $seen == "$path" ]] && return
    done
    order+=("$path")
}
for mod in "${wanted[@]}"; do
    line=$(grep -E "/${mod}\.ko(\.[a-z]+)?:" "$moddir/modules.dep" || true)
    if [[ -z $line ]]; then
        grep -qE "/${mod}\.ko$" "$moddir/modules.builtin" ||
            die "$mod is neither a module nor built into $kver"
        step "    $mod is built in"
        continue
    fi
    read -r -a deps <<<"${line#*:}"
    for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
        add_module "${deps[i]}"
    done
    add_module "${line%%:*}"
done

step "3/3 initramfs: busybox-static, ${#order[@]} modules, /init"
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,newroot,lib/modules}
cp -- "$busybox" "$root/bin/busybox"
: >"$out/modules.load"
for path in "${order[@]}"; do
    base=$(basename -- "$path")
    case $base in
        *.ko) cp -- "$moddir/$path" "$root/lib/modules/$base" ;;
        # busybox insmod takes plain ELF objects: decompress on the host.
        *.ko.xz) xz -dc -- "$moddir/$path" >"$root/lib/modules/${base%.xz}" ;;
        *.ko.zst) zstd -qdc -- "$moddir/$path" >"$root/lib/modules/${base%.zst}" ;;
        *) die "unexpected module file $path" ;;
    esac
    echo "${base%.ko*}.ko" >>"$out/modules.load"
done
cp -- "$out/modules.load" "$root/lib/modules/load"
cat >"$root/init" <<'EOF'
#!/bin/busybox sh
# rvmm stock-kernel initramfs: load the virtio modules, mount /dev/vda, hand over to its
# /init (or /sbin/init); power off if there is nothing to run.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/load); do
    insmod "/lib/modules/$m" && echo "RVMM-STOCK loaded $m"
done
if mount -t ext4 /dev/vda /newroot; then
    echo "RVMM-STOCK mounted /dev/vda"
    for init in /init /sbin/init; do
        [ -x "/newroot$init" ] && exec switch_root /newroot "$init"
    done
fi
echo "RVMM-STOCK nothing to run on /dev/vda, powering off"
poweroff -f
EOF
chmod 755 "$root/init"
(cd -- "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) >"$out/initramfs.cpio"

cache_finish
