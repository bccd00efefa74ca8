#!/bin/sh
# Guest side of tests/balloon.rs: init (init=/balloon_init.sh) on a copy of rootfs.ext4. Fills
# 200 MiB of tmpfs, holds it while the host measures, frees it, and idles while free page
# reporting hands the pages back. Every step is an "RVMM-BALLOON " line in the kernel log.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o size=256m tmpfs /tmp
report() { echo "RVMM-BALLOON $*" >/dev/kmsg; }

ls /sys/bus/virtio/drivers/virtio_balloon | grep -q virtio && report "driver bound"
dd if=/dev/zero of=/tmp/fill bs=1M count=200 2>/dev/null
report "filled $(grep -o 'MemFree: *[0-9]* kB' /proc/meminfo)"
sleep 5
rm /tmp/fill
report "freed $(grep -o 'MemFree: *[0-9]* kB' /proc/meminfo)"
sleep 20
report "done"
poweroff -f
