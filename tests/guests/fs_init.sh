#!/bin/sh
# Guest side of tests/virtiofs.rs: init (init=/fs_init.sh) on a copy of rootfs.ext4. The kernel
# hands the test's parameters from its command line to init as environment: fs_tag (what to
# mount), fs_token (what to write back) and, optionally, fs_ro_tag (a read-only share). Every
# result is an "RVMM-FS " line in the kernel log, which the test reads on the console.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
report() { echo "RVMM-FS $*" >/dev/kmsg; }

mkdir -p /mnt
if mount -t virtiofs "$fs_tag" /mnt; then
    report "mounted $(grep " /mnt " /proc/mounts)"
    report "read $(cat /mnt/from-host.txt)"
    echo "$fs_token" >/mnt/from-guest.txt
    report "wrote $(cat /mnt/from-guest.txt)"
    mkdir /mnt/dir-from-guest && report "listed $(ls /mnt | tr '\n' ' ')"
    umount /mnt && report "unmounted"
else
    report "mount failed"
fi
# With fs_ro_tag: a share the host made read-only, which the guest can read and not write.
if [ -n "$fs_ro_tag" ]; then
    mkdir -p /ro
    mount -t virtiofs "$fs_ro_tag" /ro && report "ro-read $(cat /ro/from-host.txt)"
    # A subshell: the shell reports its failed redirection on its own stderr.
    if (echo no >/ro/from-guest.txt) 2>/tmp/ro-err; then
        report "ro-write succeeded"
    else
        report "ro-write refused: $(cat /tmp/ro-err)"
    fi
    umount /ro
fi
report "done"
# The kernel's own reboot messages would follow; silence the console so that these lines are
# the last.
echo 0 >/proc/sys/kernel/printk
reboot -f
