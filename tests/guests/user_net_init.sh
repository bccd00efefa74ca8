#!/bin/sh
# Guest side of tests/user_net.rs: init (init=/user_net_init.sh) on a copy of rootfs.ext4, whose
# busybox has every applet. eth0 is already up with 10.0.2.15/24 and a default route through
# 10.0.2.2: the kernel set it from the ip= parameter rvmm adds for --net user. The kernel hands
# the test's parameters to init as environment: host_port (the test's TCP listener on the
# host's 127.0.0.1, reached through the gateway), down_port and up_port (its bulk listeners),
# bulk_bytes and up_seed (how much of which stream to send up, see tests/user_net.rs) and
# token (what the web page says).
# Every result is an "RVMM-USERNET " line in the kernel log, which the test reads on the console.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
report() { echo "RVMM-USERNET $*" >/dev/kmsg; }

inet=$(ip -4 addr show dev eth0 | grep -o 'inet [0-9./]*')
report "eth0 $inet, $(ip route | grep -o 'default via [0-9.]*')"

# The host writes its line first and closes once it has read ours. Its line is taken as soon as
# it is in, not at the end of the connection: Debian 12's passt (2023-03) does not always pass
# the host's close on to a guest that closed its own side first.
: >/tmp/reply
echo "hello from the guest" | nc -w 30 10.0.2.2 "$host_port" >>/tmp/reply 2>&1 &
nc_pid=$!
i=0
while [ $i -lt 300 ] && [ "$(wc -l </tmp/reply)" -lt 1 ]; do
    sleep 0.1
    i=$((i + 1))
done
kill $nc_pid 2>/dev/null
report "gateway $(head -n 1 /tmp/reply)"
# Bulk both ways: wget stops at the Content-Length; net_probe sends a seeded stream and closes.
down=$(wget -q -O - "http://10.0.2.2:$down_port/bulk" | sha256sum)
report "down ${down%% *}"
/net_probe send 10.0.2.2 "$up_port" "$bulk_bytes" "$up_seed"

stats=/sys/class/net/eth0/statistics
report "counters rx $(cat $stats/rx_packets) tx $(cat $stats/tx_packets)" \
    "rx_dropped $(cat $stats/rx_dropped) tx_dropped $(cat $stats/tx_dropped)"

mkdir /tmp/www
echo "served by the guest: $token" >/tmp/www/index.html
httpd -p 80 -h /tmp/www
report "httpd up"
# The test ends the VM (by killing passt).
while :; do sleep 60; done
