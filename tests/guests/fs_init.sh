#!/bin/sh
# Guest side of tests/virtiofs.rs: init (init=/fs_init.sh) on a copy of rootfs.ext4. The kernel
# hands the test's parameters from its command line to init as environment: fs_tag (what to
# mount), fs_token (what to write back) and, optionally, fs_ro_tag (a read-only share),
# fs_meta=1 (the metadata and live-change checks) and fs_busy=1 (keep using the share until
# the VM is stopped). Every result is an "RVMM-FS " line in the kernel log, which the test reads
# on the console.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
report() { echo "RVMM-FS $*" >/dev/kmsg; }

# Polls (0.2 s, at most 60 s) until FILE exists: the host makes it while the guest runs.
wait_for() {
    i=0
    while [ ! -e "$1" ] && [ $i -lt 300 ]; do
        sleep 0.2
        i=$((i + 1))
    done
}

# What the host prepared in /mnt, then what the guest changes for the host to check.
meta_checks() {
    report "host-mtime $(stat -c %Y /mnt/host-mtime.txt)"
    report "host-mode $(stat -c %a /mnt/host-0640.txt)"
    report "host-link $(readlink /mnt/host-link) $(cat /mnt/host-link)"
    report "many $(ls /mnt/many | wc -l)"
    # Each result is reported even when its command failed, so the test fails on the line.
    mv /mnt/to-rename.txt /mnt/renamed.txt
    report "renamed $(cat /mnt/renamed.txt)"
    rm /mnt/to-remove.txt
    report "removed $([ -e /mnt/to-remove.txt ] && echo no || echo yes)"
    ln -s from-guest.txt /mnt/guest-link
    report "linked $(readlink /mnt/guest-link)"
    touch -d @1600000000 /mnt/guest-mtime.txt
    report "touched $(stat -c %Y /mnt/guest-mtime.txt)"
    touch /mnt/guest-0751.txt && chmod 0751 /mnt/guest-0751.txt
    report "chmod $(stat -c %a /mnt/guest-0751.txt)"
    report "waiting"
    wait_for /mnt/late.txt
    report "late $(cat /mnt/late.txt)"
}

# Reads the share every 0.2 s for at most 60 s: requests in flight when its backend dies.
stay_busy() {
    report "busy"
    i=0
    while [ $i -lt 300 ] && cat /mnt/from-host.txt >/dev/null; do
        sleep 0.2
        i=$((i + 1))
    done
    report "idle after $i reads"
}

mkdir -p /mnt
if mount -t virtiofs "$fs_tag" /mnt; then
    report "mounted $(grep " /mnt " /proc/mounts)"
    report "read $(cat /mnt/from-host.txt)"
    echo "$fs_token" >/mnt/from-guest.txt
    report "wrote $(cat /mnt/from-guest.txt)"
    mkdir /mnt/dir-from-guest && report "listed $(ls /mnt | tr '\n' ' ')"
    [ -n "$fs_meta" ] && meta_checks
    [ -n "$fs_busy" ] && stay_busy
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
