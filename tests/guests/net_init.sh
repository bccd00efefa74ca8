#!/bin/sh
# Guest side of tests/net.rs: init (init=/net_init.sh) on a copy of rootfs.ext4, whose busybox
# has every applet. The kernel hands the test's parameters from its command line to init as
# environment: net_host, net_guest (the /30's two ends), net_port (the host's TCP listener),
# net_bytes and net_seed (how much of which stream to send, see tests/net.rs), net_recv_port
# (the host's TCP sender of the same stream), vsock_call (host vsock port), vsock_echo (guest
# vsock port).
# Every result is an "RVMM-NET " line in the kernel log, which the test reads on the console.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
report() { echo "RVMM-NET $*" >/dev/kmsg; }

ip addr add "$net_guest/30" dev eth0
ip link set eth0 up
report "eth0 $(cat /sys/class/net/eth0/address) $(ip -4 addr show dev eth0 | grep -o 'inet [0-9./]*')"

ping -c 3 -W 10 "$net_host" >/tmp/ping 2>&1
report "ping $(grep 'packets received' /tmp/ping)"

report "hwrng $(cat /sys/class/misc/hw_random/rng_current)" \
    "$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"

# TCP sizes its segmentation-offload frames by the connection's pacing rate, down to
# tcp_min_tso_segs (2) at the ~0.1 MiB/s an emulated guest kernel manages: then every frame
# costs the guest kernel about as much as a 64 KiB one. Frames of up to 64 KiB made the
# transfer ~5x faster on such a host; on hardware KVM they are that big anyway.
echo 64 >/proc/sys/net/ipv4/tcp_min_tso_segs
/net_probe send "$net_host" "$net_port" "$net_bytes" "$net_seed"
# The other way: large frames from the host's TCP go straight into the receive buffers.
/net_probe recv "$net_host" "$net_recv_port" "$net_seed"

# One after the other, so that the console lines come in a fixed order.
/net_probe call "$vsock_call" "hello from the guest"
/net_probe echo "$vsock_echo"
report "done"
reboot -f
