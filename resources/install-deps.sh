#!/usr/bin/env bash
# Installs, from Debian's archive, everything rvmm needs to build its guest artifacts and run
# its tests on a fresh Debian 12 machine. Run as root; safe to run again.
set -euo pipefail

packages=(
    # guest kernel build
    linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils lz4
    # guest root filesystems and their inspection in tests
    busybox-static e2fsprogs
    # the container-host guest (rvmm run): the OCI runtime copied into its root disk
    crun
    # the stock-kernel guest (build-stock-guest.sh runs depmod)
    kmod
    # iasl: the DSDT unit test checks rvmm's AML against ACPICA's disassembler
    acpica-tools
    # the reference VMM for side-by-side comparisons
    qemu-system-x86
    # virtio-fs tests: the vhost-user backend, /usr/lib/qemu/virtiofsd
    qemu-system-common
    # network tests: namespaces, TAP devices, ping; user-mode networking (--net user)
    iproute2 iputils-ping passt
    # rvmm bench: the container runtime and the disk and network workloads
    crun fio iperf3
    # rvmm-oci's tests: podman (with conmon) drives it as its OCI runtime
    podman
    # tests/oci_engines.rs: containerd (ctr, its runc shim) and Docker drive rvmm-oci as well
    containerd docker.io
    # the nested-KVM test machine (resources/nested-kvm.sh): QEMU above, and jq for test.sh
    jq
)

echo "==> apt-get update"
apt-get update -q
echo "==> installing: ${packages[*]}"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}"
