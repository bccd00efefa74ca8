#!/bin/bash
# Soak test (not part of `cargo test`): many short VMs of the tiny guests in tests/guests/, one
# after another and then all at once, checking that every run succeeds and that rvmm's memory
# and open descriptors do not grow from run to run.
#
#   resources/soak.sh [SEQUENTIAL [CONCURRENT]]      (defaults: 200 and 20)
#
# Each sequential run boots hello.S (prints a line, resets: exit 0) under /usr/bin/time for
# rvmm's peak RSS, then spin.S (prints a line, spins) whose /proc/PID/fd and VmRSS are sampled
# while it runs before SIGTERM stops it (exit 143). The concurrent round starts CONCURRENT
# spinning guests at once, samples them all, and stops them. RVMM=path overrides the binary
# (default: a release build, built first). Needs /dev/kvm, cc and /usr/bin/time.
set -euo pipefail

SEQ=${1:-200}
CONC=${2:-20}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/rvmm-soak.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

if [ -z "${RVMM:-}" ]; then
    (cd "$ROOT" && nice -n 10 cargo build --release --bin rvmm -q)
    RVMM=$ROOT/target/x86_64-unknown-linux-gnu/release/rvmm
fi
for g in hello spin; do
    cc -nostdlib -static -no-pie -Wl,--build-id=none -Wl,-Ttext=0x200000 \
        -o "$WORK/$g.elf" "$ROOT/tests/guests/$g.S"
done

fail() { echo "soak: FAILED: $*" >&2; exit 1; }

# Waits until FILE has a line containing TEXT (5 s at most).
wait_line() {
    for _ in $(seq 500); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.01
    done
    return 1
}

# "fds rss_kib" of a running rvmm.
sample() {
    echo "$(ls "/proc/$1/fd" | wc -l) $(awk '/^VmRSS/ {print $2}' "/proc/$1/status")"
}

# Starts a spinning guest in the background (a child of this shell); its pid is in $PID.
start_spin() {
    "$RVMM" --kernel "$WORK/spin.elf" >"$WORK/spin-$1.out" 2>"$WORK/spin-$1.err" </dev/null &
    PID=$!
}

stop_spin() {
    kill -TERM "$1"
    local status=0
    wait "$1" || status=$?
    [ "$status" -eq 143 ] || fail "spin run $2 ended with status $status: $(cat "$WORK/spin-$2.err")"
}

# min / max / mean of the first and last ten values of a column file.
summary() {
    awk -v what="$2" '{v[NR]=$1}
        END {min=v[1]; max=v[1]; for (i=1;i<=NR;i++) {if (v[i]<min) min=v[i]; if (v[i]>max) max=v[i]}
             n=(NR<10)?NR:10; a=0; b=0
             for (i=1;i<=n;i++) {a+=v[i]; b+=v[NR-n+i]}
             printf "  %-30s min %6d  max %6d  first-10 mean %8.1f  last-10 mean %8.1f\n", what, min, max, a/n, b/n}' "$1"
}

echo "soak: $SEQ sequential runs of $RVMM"
: >"$WORK/peak" ; : >"$WORK/fds" ; : >"$WORK/rss"
for i in $(seq "$SEQ"); do
    status=0
    /usr/bin/time -f "%M" -o "$WORK/time" "$RVMM" --kernel "$WORK/hello.elf" \
        >"$WORK/hello.out" 2>"$WORK/hello.err" </dev/null || status=$?
    [ "$status" -eq 0 ] || fail "hello run $i ended with status $status: $(cat "$WORK/hello.err")"
    grep -q "RVMM-TINY hello" "$WORK/hello.out" || fail "hello run $i printed no greeting"
    tail -n 1 "$WORK/time" >>"$WORK/peak"

    start_spin "$i"
    pid=$PID
    wait_line "$WORK/spin-$i.out" "RVMM-TINY spinning" || fail "spin run $i did not start"
    read -r fds rss < <(sample "$pid")
    echo "$fds" >>"$WORK/fds"; echo "$rss" >>"$WORK/rss"
    stop_spin "$pid" "$i"
    rm -f "$WORK/spin-$i.out" "$WORK/spin-$i.err"
done
summary "$WORK/peak" "hello peak RSS (KiB)"
summary "$WORK/rss" "spin RSS while running (KiB)"
summary "$WORK/fds" "spin open fds"

echo "soak: $CONC concurrent runs"
pids=()
for i in $(seq "$CONC"); do
    start_spin "c$i"
    pids+=("$PID")
done
: >"$WORK/cfds" ; : >"$WORK/crss"
for i in $(seq "$CONC"); do
    wait_line "$WORK/spin-c$i.out" "RVMM-TINY spinning" || fail "concurrent run $i did not start"
    read -r fds rss < <(sample "${pids[$((i - 1))]}")
    echo "$fds" >>"$WORK/cfds"; echo "$rss" >>"$WORK/crss"
done
for i in $(seq "$CONC"); do stop_spin "${pids[$((i - 1))]}" "c$i"; done
summary "$WORK/crss" "concurrent RSS (KiB)"
summary "$WORK/cfds" "concurrent open fds"

# Open descriptors must be the same in every run; RSS may wobble by a few pages, but the last
# runs must not use 10% more than the first ones.
[ "$(sort -u "$WORK/fds" "$WORK/cfds" | wc -l)" -eq 1 ] || fail "open fds differ between runs"
for f in peak rss; do
    awk '{v[NR]=$1} END {n=(NR<10)?NR:10; a=0; b=0; for (i=1;i<=n;i++) {a+=v[i]; b+=v[NR-n+i]}
         exit !(b <= a * 1.1)}' "$WORK/$f" || fail "RSS grew from run to run ($f)"
done
echo "soak: ok ($SEQ sequential, $CONC concurrent, no failure)"
