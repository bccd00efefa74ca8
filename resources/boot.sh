#!/usr/bin/env bash
# The README's first command ends here: builds rvmm and boots the project's guest
# (resources/build-guest.sh) until its init prints its `RVMM-INIT` lines and powers off. On
# a host whose KVM cannot run guest user space (emulated kvm_pvm, or no /dev/kvm) the same
# rvmm command runs inside the nested-KVM machine (resources/nested-kvm.sh), and this says so.
# Exit status: rvmm's.
set -euo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.."
# shellcheck source=kvm-platform.sh
source resources/kvm-platform.sh

dir=$(resources/build-guest.sh)
cargo build --release --locked >&2
rvmm=(target/x86_64-unknown-linux-gnu/release/rvmm
    --kernel "$dir/vmlinux" --initrd "$dir/initramfs.cpio" --cpus 2 --memory 256)
case $(kvm_platform) in
    hardware)
        echo "==> booting on this host's KVM: ${rvmm[*]}" >&2
        exec "${rvmm[@]}"
        ;;
    emulated)
        why="this host's KVM emulates guest kernel code (kvm_pvm) and cannot run guest user space"
        ;;
    none)
        why="this host has no /dev/kvm"
        ;;
esac
echo "==> $why: booting inside the nested-KVM machine (QEMU TCG with SVM, resources/nested-kvm.sh): ${rvmm[*]}" >&2
exec resources/nested-kvm.sh -- "${rvmm[@]}"
