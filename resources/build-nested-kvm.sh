#!/usr/bin/env bash
# Build the nested-KVM test machine: Debian's own amd64 kernel, exactly as Debian ships it,
# and a small initramfs that mounts this host's root (9p, read-only) under a copy-on-write
# overlay and starts resources/nested-kvm/stage2 there. Booted under QEMU's TCG with AMD SVM
# emulated (resources/nested-kvm.sh), that kernel loads kvm_amd with nested paging: a real
# KVM on hosts whose own /dev/kvm is emulated (kvm_pvm) or absent.
#
# Inputs: this script, lib.sh, nested-kvm/, the version of the image package that
# linux-image-amd64 points at, busybox-static. The package is fetched with `apt-get download`
# (only from the configured apt sources); nothing is installed.
# Output: ${XDG_CACHE_HOME:-$HOME/.cache}/rvmm/nested-<key>/{vmlinuz,initramfs.cpio,
# modules/,kernel-version}; modules/ is the package's whole module tree (with modules.dep),
# which the running machine bind-mounts at /lib/modules/<version> so that modprobe and the
# kernel's own module autoloading work there. ${XDG_CACHE_HOME:-$HOME/.cache}/rvmm/nested
# links to the newest. stdout carries only that directory; progress goes to stderr.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: build-nested-kvm.sh [--print-dir] [--force]

Fetches Debian's amd64 kernel and builds the initramfs of the nested-KVM test machine,
and prints the directory that holds them.

  --print-dir   print where the artifacts are (or would be) and exit
  --force       rebuild even if the artifacts are already complete
  -h, --help    show this help
EOF
}

name=nested
# shellcheck source=lib.sh
source "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
# shellcheck source=debian-kernel.sh
source "$resources/debian-kernel.sh"
parse_build_args "$@"

meta=linux-image-amd64
busybox=/bin/busybox
# What the initramfs loads before it can reach the host's root: virtio-pci, the 9p
# transport, the scratch disk and the overlay. Everything else is modprobed from the full
# tree once the root is up.
bootstrap=(virtio_pci 9pnet_virtio 9p virtio_blk ext4 overlay)

for tool in apt-cache apt-get dpkg-deb depmod modprobe cpio; do
    command -v "$tool" >/dev/null || die "$tool not found: install kmod, cpio and apt (Debian 12)"
done
busybox_version=$(pkg_version busybox-static)
[[ -n $busybox_version && -x $busybox ]] || die "$busybox missing: install package busybox-static"

resolve_kernel_package "$meta"

key=$(input_key "$image_pkg $image_version busybox-static $busybox_version" \
    build-nested-kvm.sh debian-kernel.sh nested-kvm)
cache_setup "$key"
step "building $name-$key ($image_pkg $image_version)"

step "1/3 apt-get download $image_pkg=$image_version"
fetch_kernel_package "$work"
mv -T -- "$work/pkg/lib/modules/$kver" "$out/modules"
printf '%s\n' "$kver" >"$out/kernel-release"

step "2/3 resolving ${bootstrap[*]}"
# modprobe --show-depends prints "insmod PATH" for each module a name needs, dependencies
# first, and "builtin NAME" for parts of the kernel image. It needs the tree at
# DIR/lib/modules/VERSION: point a scratch link there.
mkdir -p "$work/modroot/lib/modules"
ln -sfn "$out/modules" "$work/modroot/lib/modules/$kver"
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,lower,scratch,newroot,lib/modules}
order=()
for mod in "${bootstrap[@]}"; do
    deps=$(modprobe -d "$work/modroot" -S "$kver" --show-depends "$mod") ||
        die "$mod: not in $image_pkg"
    while read -r kind path _; do
        [[ $kind == insmod ]] || continue
        base=$(basename -- "$path")
        [[ -e $root/lib/modules/$base ]] && continue
        cp -- "$path" "$root/lib/modules/$base"
        order+=("$base")
    done <<<"$deps"
done
printf '%s\n' "${order[@]}" >"$root/lib/modules/load"

step "3/3 initramfs: busybox-static, ${#order[@]} modules, /init"
cp -- "$busybox" "$root/bin/busybox"
cp -- "$resources/nested-kvm/init" "$root/init"
cp -- "$resources/nested-kvm/stage2" "$root/stage2"
chmod 755 "$root/init" "$root/stage2"
(cd -- "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) \
    >"$out/initramfs.cpio"

cache_finish
