#!/usr/bin/env bash
# Build the container-host guest for `rvmm run`: the project's guest kernel (from
# build-guest.sh, or $RVMM_GUEST_DIR) and a read-only ext4 root with busybox-static,
# Debian's crun with its shared libraries and dynamic loader, and rvmm-agent (a static
# Rust binary from this workspace) as /sbin/init.
#
# The kernel needs nothing beyond resources/guest/kernel.config: namespaces (pid, net, ipc,
# uts, mount, cgroup), cgroup v2 with pids/memory/cpu and BPF device control, overlayfs,
# tmpfs, devtmpfs, ext4 and virtio-vsock are all enabled there.
#
# Output: ${XDG_CACHE_HOME:-$HOME/.cache}/rvmm/container-guest-<key>/{vmlinux,rootfs.ext4};
# ${XDG_CACHE_HOME:-$HOME/.cache}/rvmm/container-guest links to the newest.
# Packages (CI installs them): busybox-static crun e2fsprogs; cargo must be on PATH.
set -euo pipefail

usage() {
    cat <<'EOT'
Usage: build-container-guest.sh [--print-dir] [--force]

Builds the container-host guest (kernel + root disk with crun and rvmm-agent) into the
cache and prints the directory that holds it.

  --print-dir   print where the artifacts are (or would be) and exit
  --force       rebuild even if the artifacts are already complete
  -h, --help    show this help
EOT
}

name=container-guest
# shellcheck source=lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
parse_build_args "$@"

repo=$(cd -- "$resources/.." && pwd)
busybox=/bin/busybox
crun=/usr/bin/crun
need() { command -v "$1" >/dev/null || die "$1 missing: install package $2"; }
need mkfs.ext4 e2fsprogs
need debugfs e2fsprogs
need cargo "Rust (cargo)"
[[ -x $crun ]] || die "$crun missing: install package crun"
[[ -n $(pkg_version busybox-static) && -x $busybox ]] || die "$busybox missing: install package busybox-static"

if ((print_dir)) && [[ -z ${RVMM_GUEST_DIR:-} ]]; then
    guest_dir=$("$resources/build-guest.sh" --print-dir)
else
    guest_dir=${RVMM_GUEST_DIR:-$("$resources/build-guest.sh")}
fi
kernel=$guest_dir/vmlinux
if ((print_dir)) && [[ ! -f $kernel ]]; then
    kernel_sum=unbuilt
else
    [[ -f $kernel ]] || die "no kernel at $kernel"
    kernel_sum=$(sha256sum <"$kernel")
fi

key=$(input_key "kernel ${kernel_sum%% *} crun $(pkg_version crun) busybox-static $(pkg_version busybox-static)" \
    build-container-guest.sh ../agent ../Cargo.toml ../Cargo.lock)
cache_setup "$key"
step "building container-guest-$key (kernel from $guest_dir)"

step "1/3 rvmm-agent (static)"
# A target dir of its own: crt-static must not mix with the workspace's normal builds.
(cd -- "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
    -p rvmm-agent --target x86_64-unknown-linux-gnu --target-dir "$cache/container-guest-target") >&2
agent=$cache/container-guest-target/x86_64-unknown-linux-gnu/release/rvmm-agent
file -b "$agent" 2>/dev/null | grep -q 'static' || ldd "$agent" 2>&1 | grep -q 'not a dynamic' ||
    die "rvmm-agent is not statically linked"

step "2/3 root filesystem (busybox, crun $(pkg_version crun), rvmm-agent)"
stage=$work/rootfs
rm -rf -- "$stage"
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,mnt/image}
cp "$busybox" "$stage/bin/busybox"
"$busybox" --list-full | while IFS= read -r applet; do
    [[ $applet == bin/busybox || -e $stage/$applet ]] && continue
    ln -s /bin/busybox "$stage/$applet"
done
rm -f "$stage/sbin/init"
install -m 0755 "$agent" "$stage/sbin/init"
install -m 0755 "$crun" "$stage/usr/bin/crun"
# crun's libraries and the dynamic loader, at the paths ldd resolves them to.
ldd "$crun" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' | while IFS= read -r lib; do
    mkdir -p "$stage/$(dirname -- "$lib")"
    cp -L "$lib" "$stage/$lib"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$stage/etc/passwd"
printf 'root:x:0:\n' >"$stage/etc/group"
chmod 1777 "$stage/tmp"

step "3/3 vmlinux and rootfs.ext4"
cp "$kernel" "$out/vmlinux"
size_mib=$(($(du -sm "$stage" | cut -f1) + 16))
mkfs.ext4 -q -F -b 4096 -L rvmm-chost -d "$stage" -O ^has_journal -m 0 \
    -E root_owner=0:0 "$out/rootfs.ext4" "${size_mib}M" >&2
if (($(id -u) != 0)); then
    (cd -- "$stage" && find . -mindepth 1) | sed 's|^\.||' |
        while IFS= read -r f; do printf 'sif %s uid 0\nsif %s gid 0\n' "$f" "$f"; done |
        debugfs -w -f - "$out/rootfs.ext4" >/dev/null 2>&1
fi
cache_finish
