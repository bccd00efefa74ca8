#!/usr/bin/env bash
# Build rvmm's test guest: a minimal Linux 6.1 microVM kernel (vmlinux and
# bzImage), an initramfs and an ext4 root disk, both with busybox-static, plus
# vmlinux-selftest: the same kernel with the in-guest device self-test built in
# (resources/selftest/, enabled by rvmm_selftest=... on the command line).
#
# Inputs: this script, resources/guest/ (kernel config fragments, compat and
# test patches, init scripts), resources/selftest/, Debian's linux-source-6.1
# and busybox-static.
# Output: ${XDG_CACHE_HOME:-$HOME/.cache}/rvmm/guest-<key>/, where <key> is a
# sha256 over all inputs; ${XDG_CACHE_HOME:-$HOME/.cache}/rvmm/guest links to
# the newest one. A complete output (".complete" stamp) is reused as is.
#
# stdout carries only the output directory, so `dir=$(build-guest.sh)` works;
# progress goes to stderr. Packages are not installed here (CI does that):
#   apt-get install linux-source-6.1 busybox-static e2fsprogs build-essential \
#       bc bison flex libelf-dev libssl-dev cpio
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: build-guest.sh [--print-dir] [--force]

Builds rvmm's guest kernel, initramfs and ext4 root disk into the cache and
prints the directory that holds them.

  --print-dir   print where the artifacts are (or would be) and exit
  --force       rebuild even if the artifacts are already complete
  -h, --help    show this help
EOF
}

name=guest
# shellcheck source=lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
parse_build_args "$@"

guest=$resources/guest
selftest=$resources/selftest
ksrc_pkg="linux-source-6.1"
ksrc_tar=/usr/src/linux-source-6.1.tar.xz
busybox=/bin/busybox
rootfs_size=64M

# --- inputs and cache key -------------------------------------------------------
[[ $(uname -m) == x86_64 ]] || die "the guest is an x86_64 kernel; build it on an x86_64 host"
command -v dpkg-query >/dev/null || die "dpkg-query not found: this script expects Debian 12"
ksrc_version=$(pkg_version "$ksrc_pkg")
busybox_version=$(pkg_version busybox-static)
[[ -n $ksrc_version && -r $ksrc_tar ]] || die "$ksrc_tar missing: install package $ksrc_pkg"
# Debian's dynamically linked "busybox" package also installs /bin/busybox,
# but the guest has no libc: it must be the static one.
[[ -n $busybox_version && -x $busybox ]] || die "$busybox missing: install package busybox-static"

key=$(input_key "$ksrc_pkg $ksrc_version busybox-static $busybox_version" \
    build-guest.sh guest selftest)

# --- tools ------------------------------------------------------------------------
missing=()
need() { command -v "$1" >/dev/null || missing+=("$2 (for $1)"); }
need make build-essential
need gcc build-essential
need cc build-essential
need patch patch
need tar tar
need xz xz-utils
need bc bc
need bison bison
need lz4 lz4
need flex flex
need perl perl
need mkfs.ext4 e2fsprogs
need debugfs e2fsprogs
need sha256sum coreutils
need flock util-linux
[[ -e /usr/include/gelf.h ]] || missing+=("libelf-dev (for gelf.h, objtool)")
((${#missing[@]} == 0)) || die "missing packages: ${missing[*]}"

cache_setup "$key"
step "building guest-$key ($ksrc_pkg $ksrc_version, busybox-static $busybox_version)"
linux=$work/linux

# --- kernel -------------------------------------------------------------------------
# A failed earlier run may have left the test kernel's patches in the reused
# source (step 4 applies them to the same tree): take them out again, or start
# over from the tarball if they do not come out cleanly.
if [[ -e $work/.source-ready && -e $work/.test-patched ]]; then
    step "    reverting guest/test-patches in the reused source"
    rm -f -- "$linux/init/rvmm_selftest.c"
    test_patches=("$guest"/test-patches/*.patch)
    for ((i = ${#test_patches[@]} - 1; i >= 0; i--)); do
        patch -d "$linux" -p1 -R --quiet <"${test_patches[i]}" ||
            { rm -f -- "$work/.source-ready"; break; }
    done
    rm -f -- "$work/.test-patched"
fi
if [[ ! -e $work/.source-ready ]]; then
    step "1/7 extracting $ksrc_tar"
    rm -rf -- "$linux" "$linux.tmp"
    mkdir -p "$linux.tmp"
    tar -xJf "$ksrc_tar" -C "$linux.tmp" --strip-components=1
    for p in "$guest"/patches/*.patch; do
        step "    patch $(basename -- "$p")"
        patch -d "$linux.tmp" -p1 --forward --quiet <"$p"
    done
    mv -T "$linux.tmp" "$linux"
    touch "$work/.source-ready"
else
    step "1/7 reusing patched source in $linux"
fi

step "2/7 configuring: allnoconfig + guest/kernel.config"
kmake() { make -C "$linux" -s "$@" >&2; }
# Kconfig chatter (every redefined value, "changes choice state") goes to a
# log that is shown only if something fails; the check below is what counts.
log=$work/config.log
{
    make -C "$linux" -s allnoconfig &&
        (cd -- "$linux" && scripts/kconfig/merge_config.sh -m .config "$guest/kernel.config") &&
        make -C "$linux" -s olddefconfig
} >"$log" 2>&1 || { cat "$log" >&2; die "kernel configuration failed"; }
# Kconfig silently drops values whose dependencies are unmet: insist that
# every line of a fragment made it into the final .config.
check_fragment() { # FRAGMENT
    local line sym got dropped=0 name
    name=$(basename -- "$1")
    while IFS= read -r line; do
        case $line in
            CONFIG_*=*) sym=${line%%=*} ;;
            "# CONFIG_"*" is not set") sym=${line#\# }; sym=${sym%% *} ;;
            *) continue ;;
        esac
        got=$(grep -E "^(# )?${sym}[= ]" "$linux/.config" || true)
        # "is not set" is also satisfied by a symbol that is absent altogether.
        if [[ $got != "$line" && ! ($line == "# "* && -z $got) ]]; then
            echo "build-guest: $name wants '$line', Kconfig gave '${got:-<absent>}'" >&2
            dropped=1
        fi
    done <"$1"
    ((!dropped)) || die "Kconfig did not keep $name (unmet dependencies?); see $log"
}
check_fragment "$guest/kernel.config"

jobs=$(nproc)
step "3/7 building vmlinux and bzImage (make -j$jobs, about 10 min on 2 cores)"
KBUILD_BUILD_USER=rvmm KBUILD_BUILD_HOST=rvmm kmake -j"$jobs" vmlinux bzImage
cp "$linux/vmlinux" "$linux/arch/x86/boot/bzImage" "$linux/System.map" "$out/"
cp "$linux/.config" "$out/kernel.config"

# --- test kernel ----------------------------------------------------------------------
# vmlinux-selftest = the kernel above + guest/test-patches (a hook in
# kernel_init() and CONFIG_RVMM_SELFTEST) + selftest/rvmm_selftest.c +
# guest/test-kernel.config, built incrementally in the same tree.
step "4/7 building vmlinux-selftest (test-patches + test-kernel.config, incremental)"
touch "$work/.test-patched"
for p in "$guest"/test-patches/*.patch; do
    step "    patch $(basename -- "$p")"
    patch -d "$linux" -p1 --forward --quiet <"$p"
done
cp "$selftest/rvmm_selftest.c" "$linux/init/rvmm_selftest.c"
log=$work/config-selftest.log
{
    (cd -- "$linux" && scripts/kconfig/merge_config.sh -m .config "$guest/test-kernel.config") &&
        make -C "$linux" -s olddefconfig
} >"$log" 2>&1 || { cat "$log" >&2; die "test kernel configuration failed"; }
check_fragment "$guest/kernel.config"
check_fragment "$guest/test-kernel.config"
KBUILD_BUILD_USER=rvmm KBUILD_BUILD_HOST=rvmm kmake -j"$jobs" vmlinux
cp "$linux/vmlinux" "$out/vmlinux-selftest"
cp "$linux/.config" "$out/kernel-selftest.config"

# gen_init_cpio writes device nodes and root-owned files without needing root.
cc -O2 -o "$work/gen_init_cpio" "$linux/usr/gen_init_cpio.c"

# --- initramfs ------------------------------------------------------------------------
step "5/7 initramfs.cpio (uncompressed)"
# Each archive entry costs emulated kernel time to unpack on nested hosts, so
# only the applets that /init uses are linked.
{
    echo "dir /dev 0755 0 0"
    echo "nod /dev/console 0600 0 0 c 5 1"
    for d in /bin /proc /sys /tmp; do echo "dir $d 0755 0 0"; done
    echo "file /bin/busybox $busybox 0755 0 0"
    for a in sh mount cat awk nproc reboot; do echo "slink /bin/$a busybox 0777 0 0"; done
    echo "file /init $guest/initramfs/init 0755 0 0"
} >"$work/initramfs.list"
"$work/gen_init_cpio" -t 0 "$work/initramfs.list" >"$out/initramfs.cpio"

# --- root disk ------------------------------------------------------------------------
step "6/7 rootfs.ext4 ($rootfs_size, mkfs.ext4 -d, no mounts)"
stage=$work/rootfs
rm -rf -- "$stage"
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc}
cp "$busybox" "$stage/bin/busybox"
# The disk gets every applet (handy on real KVM); lookups cost nothing at boot.
"$busybox" --list-full | while IFS= read -r applet; do
    [[ $applet == bin/busybox || -e $stage/$applet ]] && continue
    ln -s /bin/busybox "$stage/$applet"
done
rm -f "$stage/sbin/init"  # busybox lists an init applet; ours replaces it
install -m 0755 "$guest/rootfs/init" "$stage/sbin/init"
chmod 1777 "$stage/tmp"
rm -f "$out/rootfs.ext4"
# lazy_*_init=0: the guest kernel must not spend emulated time zeroing
# inode tables in the background. 4 KiB blocks: fewer virtio requests.
mkfs.ext4 -q -F -b 4096 -L rvmm-root -d "$stage" \
    -E lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0 \
    "$out/rootfs.ext4" "$rootfs_size" >&2
if (($(id -u) != 0)); then
    # mkfs -d copies the staging owners; make everything root's as in a real root.
    (cd -- "$stage" && find . -mindepth 1) | sed 's|^\.||' |
        while IFS= read -r f; do printf 'sif %s uid 0\nsif %s gid 0\n' "$f" "$f"; done |
        debugfs -w -f - "$out/rootfs.ext4" >/dev/null 2>&1
fi

# --- done -----------------------------------------------------------------------------
step "7/7 finishing"
cache_finish
