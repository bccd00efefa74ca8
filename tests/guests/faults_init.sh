#!/bin/sh
# /faults_init.sh of the fault battery (tests/faults.rs), on a read-only copy of rootfs.ext4
# with the disk under test as /dev/vdb. The kernel command line's `fault=` word picks the case;
# each reports what the guest saw on RVMM-FAULT lines, then reboots (which ends the VM with
# reboot=k). Only busybox applets.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
say() { echo "RVMM-FAULT $*" >/dev/kmsg; }
# Reads 1 MiB of /dev/vdb at MiB $1 from the disk itself, not from the guest's page cache.
read_mib() {
    echo 3 >/proc/sys/vm/drop_caches
    [ "$(dd if=/dev/vdb bs=1M skip="$1" count=1 2>/dev/null | wc -c)" = 1048576 ]
}
case $fault in
    enospc)
        # More than the host file system under the image holds: the flush must fail.
        if dd if=/dev/zero of=/dev/vdb bs=1M count=24 conv=fsync 2>/dev/null; then
            say "enospc write-ok"
        else
            say "enospc write-failed"
        fi
        # The device still serves what the host could store.
        if read_mib 0; then say "enospc read-ok"; else say "enospc read-failed"; fi
        ;;
    truncate)
        if read_mib 8; then say "truncate ready"; else say "truncate read-failed-early"; fi
        # The host truncates the image now; the same read must then fail.
        i=0
        while [ $i -lt 120 ] && read_mib 8; do
            sleep 1
            i=$((i + 1))
        done
        if read_mib 8; then say "truncate read-ok"; else say "truncate read-failed"; fi
        if read_mib 0; then say "truncate head-ok"; else say "truncate head-failed"; fi
        ;;
    oom)
        # Doubles a shell string until the guest's memory runs out.
        sh -c 'x=0123456789abcdef; while :; do x=$x$x; done' 2>/dev/null
        status=$?
        killed=$(dmesg | grep -c 'Out of memory')
        say "oom survived status=$status oom-kills=$killed"
        ;;
    *) say "no such case: $fault" ;;
esac
echo 0 >/proc/sys/kernel/printk
reboot -f
