#!/bin/sh
# /snapshot_init.sh of the snapshot test (tests/snapshot.rs), on a read-only copy of
# rootfs.ext4 with a scratch disk as /dev/vdb: counts, printing each number on the console
# and writing it, synced, into its own 512-byte sector of /dev/vdb, five times a second; at
# 2000 it reboots (which ends the VM with reboot=k). Only busybox applets.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
i=0
while [ $i -lt 2000 ]; do
    i=$((i + 1))
    printf '%08d\n' $i | dd of=/dev/vdb bs=512 seek=$i conv=sync,fsync 2>/dev/null
    echo "RVMM-COUNT $i"
    sleep 0.2
done
reboot -f
