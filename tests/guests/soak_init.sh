#!/bin/sh
# /soak_init.sh of the soak test (tests/soak.rs), on a read-only copy of rootfs.ext4: reports
# the devices the guest found, gives the host a second to sample rvmm, then reboots (which
# ends the VM with reboot=k). Only busybox applets.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
count() { ls "$1" 2>/dev/null | grep -c "$2"; }
echo "RVMM-SOAK ready nproc=$(nproc) disks=$(count /sys/block vd) nets=$(count /sys/class/net eth) vsock=$(count /dev vsock)" >/dev/kmsg
sleep 1
echo 0 >/proc/sys/kernel/printk
reboot -f
