#!/usr/bin/env bash
# Runs a command on a real KVM, inside the nested-KVM test machine: QEMU's TCG emulates an
# AMD CPU with SVM and nested paging, and Debian's own kernel in it loads kvm_amd. The
# machine sees this host's root at the same paths (read-only, with a copy-on-write layer
# on a scratch disk that is thrown away) plus the directories given with --rw, which are
# shared writable. The command runs there as root in the current directory with this
# environment; its output streams to stdout and its exit status is this script's.
#
# Exit status: the command's, or 124 when --timeout ran out, 125 when the machine could not
# be built, booted or made ready, or died or stalled under the command (one line on stderr
# says which).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: nested-kvm.sh [--cpus N] [--memory MIB] [--timeout SECS] [--ready-timeout SECS]
                     [--stall SECS] [--rw DIR]... [--] COMMAND [ARG...]

Runs COMMAND on a real (nested) KVM inside a QEMU TCG machine that shares this host's root.

  --cpus N              vCPUs of the machine (default: this host's CPUs)
  --memory MIB          its memory (default 6144)
  --timeout SECS        stop the machine after SECS in all (default 3600)
  --ready-timeout SECS  fail if the machine is not ready to run COMMAND by then (default 180)
  --stall SECS          stop a machine whose first CPU shows no sign of life for SECS
                        (default 180): under TCG's emulated SVM a CPU now and then never
                        comes back from its guest
  --rw DIR              share DIR writable at the same path (repeatable)
EOF
}

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
fatal() {
    echo "nested-kvm: error: $*" >&2
    exit 125
}

cpus=$(nproc)
memory=6144
timeout=3600
ready_timeout=180
stall=180
rw=()
while (($#)); do
    case $1 in
        --cpus) cpus=${2:?}; shift 2 ;;
        --memory) memory=${2:?}; shift 2 ;;
        --timeout) timeout=${2:?}; shift 2 ;;
        --ready-timeout) ready_timeout=${2:?}; shift 2 ;;
        --stall) stall=${2:?}; shift 2 ;;
        --rw)
            dir=$(realpath -e -- "${2:?}" 2>/dev/null) && [[ -d $dir ]] || fatal "no directory $2"
            # stage2 splits the list on white space.
            [[ $dir != *[[:space:]]* ]] || fatal "--rw $dir: a path with white space"
            rw+=("$dir")
            shift 2
            ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) usage >&2; exit 2 ;;
        *) break ;;
    esac
done
(($#)) || { usage >&2; exit 2; }
for n in "$cpus" "$memory" "$timeout" "$ready_timeout" "$stall"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || fatal "not a positive number: $n"
done

qemu=qemu-system-x86_64
command -v "$qemu" >/dev/null || fatal "$qemu not found: install qemu-system-x86"
"$qemu" -accel help 2>/dev/null | grep -qx tcg || fatal "$qemu has no TCG accelerator"
command -v mkfs.ext4 >/dev/null || fatal "mkfs.ext4 not found: install e2fsprogs"
machine=$("$here/build-nested-kvm.sh") || fatal "building the nested machine failed"

# Run directories of earlier runs whose script was killed outright (its QEMU died with it).
for old in "${TMPDIR:-/tmp}"/rvmm-nested.*; do
    [[ -e $old/pid ]] && ! kill -0 "$(cat "$old/pid")" 2>/dev/null && rm -rf -- "$old"
done
run=$(mktemp -d "${TMPDIR:-/tmp}/rvmm-nested.XXXXXX")
echo $$ >"$run/pid"
qemu_pid=
watch_pid=
# Runs under set -e as the EXIT trap: no command here may fail.
cleanup() {
    if [[ -n $watch_pid ]]; then
        kill "$watch_pid" 2>/dev/null || true
    fi
    if [[ -n $qemu_pid ]] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill -KILL "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    rm -rf -- "$run"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The control share: what stage2 runs, and where it leaves readiness and the exit status.
mkdir "$run/ctl"
{
    printf 'NESTED_MODULES=%q\n' "$machine/modules"
    # Loaded before COMMAND: KVM, and what rvmm's tests, crun and podman reach for.
    printf 'NESTED_LOAD=%q\n' "kvm_amd tun tap vhost_net vhost_vsock vsock_loopback veth \
bridge br_netfilter nf_tables nft_chain_nat nft_compat xt_MASQUERADE xt_comment xt_conntrack \
xt_mark xt_multiport xt_nat xt_tcpudp xt_addrtype iptable_filter iptable_nat ip6table_filter \
ip6table_nat fuse virtiofs loop sch_fq_codel"
    printf 'NESTED_RW=%q\n' "${rw[*]}"
} >"$run/ctl/config"
{
    export -p | grep -Ev '^declare -x (OLDPWD|PWD|SHLVL|_)(=|$)'
    printf 'cd %q || exit 125\n' "$PWD"
    printf 'exec'
    printf ' %q' "$@"
    printf '\n'
} >"$run/ctl/run"

# A sparse scratch disk for the overlay's upper layer: a real filesystem, so O_DIRECT,
# Unix sockets and large files work anywhere in the tree.
truncate -s 64G "$run/scratch.img"
mkfs.ext4 -q -F -O ^has_journal -E lazy_itable_init=1,lazy_journal_init=1 "$run/scratch.img" ||
    fatal "mkfs.ext4 of the scratch disk failed"

args=(
    -accel tcg,thread=multi,tb-size=512
    -cpu EPYC-Rome,+svm,+npt,+nrip-save
    -smp "$cpus" -m "$memory"
    -nographic -nodefaults -no-reboot -serial stdio
    -kernel "$machine/vmlinuz" -initrd "$machine/initramfs.cpio"
    # A soft lockup of a minute (TCG's stalls stay far below) means a wedged machine: its
    # kernel panics and the machine ends at once (125), instead of at --timeout. kvm_amd's
    # virtual GIF only serves a hypervisor inside its guests; with it, QEMU 7.2's TCG now and
    # then crashed the machine's kernel (resources/README.md, "The nested-KVM test machine").
    -append "console=ttyS0 loglevel=3 panic=1 mitigations=off edd=off watchdog_thresh=30 softlockup_panic=1 kvm_amd.vgif=0"
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
    -virtfs "local,path=$run/ctl,mount_tag=ctl,security_model=none"
    -drive "file=$run/scratch.img,format=raw,if=virtio,cache=unsafe,discard=unmap"
)
for i in "${!rw[@]}"; do
    args+=(-virtfs "local,path=${rw[i]},mount_tag=rw$i,security_model=none,multidevs=remap")
done

echo "nested-kvm: booting $(cat "$machine/kernel-version") under TCG ($cpus vCPUs, $memory MiB)" >&2
# The console carries the command's output and the kernel's errors. Dropped: the escape
# sequences with which SeaBIOS resets and clears a terminal, its banner (whose last line has
# no newline: the guest's first line follows on it), and everything after stage2's end mark
# (the power-off messages), so that the command's last line is the last.
# setpriv: QEMU dies with this script even when the script is killed outright.
setpriv --pdeathsig KILL -- "$qemu" "${args[@]}" </dev/null \
    > >(sed -u -e 's/\x1b[c78]//g' -e 's/\x1b[()][0-9A-Za-z]//g' \
        -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e '/^SeaBIOS (version /d' -e 's/^Booting from ROM\.*//' \
        -e '/^@@rvmm-nested-kvm-end@@$/,$d') \
    2> >(grep -v 'TCG doesn.t support requested feature' >&2) &
qemu_pid=$!

# The watchdog: the machine must be ready within --ready-timeout, then keep its heartbeat
# (stage2 appends a byte to ctl/alive every few seconds from the first CPU) going, and be done
# within --timeout.
(
    trap - EXIT
    started=$SECONDS
    beat=0
    beat_at=$SECONDS
    stop() {
        echo "nested-kvm: error: $1" >&2
        : >"$run/$2"
        kill -KILL "$qemu_pid" 2>/dev/null
        exit 0
    }
    while ((SECONDS - started < timeout)); do
        if [[ ! -e $run/ctl/ready ]]; then
            ((SECONDS - started < ready_timeout)) ||
                stop "the machine was not ready in ${ready_timeout} s" not-ready
        else
            now=$(stat -c %s "$run/ctl/alive" 2>/dev/null || echo 0)
            if ((now != beat)); then
                beat=$now
                beat_at=$SECONDS
            fi
            ((SECONDS - beat_at < stall)) ||
                stop "the machine's first CPU showed no sign of life for ${stall} s (wedged)" stalled
        fi
        sleep 0.5
    done
    stop "stopped after ${timeout} s" timed-out
) &
watch_pid=$!

qemu_status=0
# (stderr: no shell notice of a QEMU the watchdog killed; the watchdog said why.)
wait "$qemu_pid" 2>/dev/null || qemu_status=$?
qemu_pid=
if [[ -e $run/ctl/status ]]; then
    exit "$(cat "$run/ctl/status")"
fi
[[ -e $run/timed-out ]] && exit 124
[[ -e $run/not-ready || -e $run/stalled ]] && exit 125
if [[ -e $run/ctl/ready ]]; then
    fatal "the machine stopped before the command ended (QEMU status $qemu_status)"
fi
fatal "the machine stopped before it was ready (QEMU status $qemu_status)"
