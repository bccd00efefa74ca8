#!/usr/bin/env bash
# The README's test command: every test of the workspace, with the Linux-level ones on a real
# KVM wherever this host's is.
#
# - Hardware KVM (or already inside the nested machine): `cargo test --workspace` as it is.
# - Emulated KVM (kvm_pvm, guest user space cannot run) or none: the unit tests and the smoke
#   layer (tiny guests, the hostile driver, seccomp, bad input, one Linux boot to `Run /init`)
#   run here, on this host's own KVM; then every integration-test binary runs inside the
#   nested-KVM machine (resources/nested-kvm.sh), where guests reach user space.
#
# The fuzz targets are libFuzzer programs, not test harnesses (test = false), but --bins
# would run them: rvmm-fuzz is left out of the unit layer.
#
# Arguments go to every test binary (a name filter, --nocapture, ...). The last line adds up
# the test harnesses' result lines of every layer. Exit status: 0 when every layer passed.
set -euo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.."
log=$(mktemp)
list=$(mktemp)
trap 'rm -f -- "$log" "$list"' EXIT

# shellcheck source=kvm-platform.sh
source resources/kvm-platform.sh

# A test binary's limit inside the nested machine (the longest, oci, takes ~6 min), and its
# machine's (boot and set-up take well under a minute).
binary_timeout=900
machine_timeout=1020

# The smoke layer: what must keep working on an emulating KVM.
smoke=(tiny_guests hostile_guest seccomp bad_input linux_smoke api jail)

# Prints "tests: N passed, M failed" over every `test result:` line of the log.
summary() {
    awk '/^test result: / {
            for (i = 1; i < NF; i++) {
                if ($(i + 1) ~ /^passed;?$/) p += $i
                if ($(i + 1) ~ /^failed;?$/) f += $i
            }
         }
         END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
    # A binary that died before its result line is in no count, only in the status.
    ((status == 0)) || echo "test.sh: error: a test layer failed (see above)" >&2
}

# Runs a command with its output also in the log; keeps going after a failure.
status=0
layer() {
    "$@" 2>&1 | tee -a "$log" || status=1
}

case $(kvm_platform) in
    hardware)
        echo "==> KVM here is hardware (or nested hardware virtualization): cargo test --workspace"
        layer cargo test --workspace --locked -- "$@"
        summary
        exit "$status"
        ;;
    emulated)
        echo "==> KVM here is emulated (kvm_pvm): smoke layer here, Linux tests on a nested KVM"
        smoke_args=()
        for t in "${smoke[@]}"; do smoke_args+=(--test "$t"); done
        layer cargo test --workspace --exclude rvmm-fuzz --locked --lib --bins "${smoke_args[@]}" \
            -- "$@"
        ;;
    none)
        echo "==> no /dev/kvm here: unit tests here, every integration test on a nested KVM"
        layer cargo test --workspace --exclude rvmm-fuzz --locked --lib --bins -- "$@"
        ;;
esac

echo "==> building the integration tests"
cargo test --workspace --locked --tests --no-run --message-format=json-render-diagnostics |
    jq -r 'select(.reason == "compiler-artifact" and .executable != null
                  and .target.kind == ["test"])
           | "\(.manifest_path | sub("/Cargo.toml$"; ""))\t\(.target.name)\t\(.executable)"' |
    sort -t $'\t' -k2,2 >"$list"
[[ -s $list ]] || { echo "test.sh: error: cargo built no integration tests" >&2; exit 1; }
# Where the smoke layer ran on this host's own KVM, its binaries do not run again nested: they
# need no guest user space, and a guest that spins without an exit (tiny_guests) once wedged
# the nested machine's CPU for good (a soft lockup: TCG never delivered the interrupt that
# brings a CPU back from its guest).
if [[ $(kvm_platform) == emulated ]]; then
    pattern=$(printf '\t%s\t|' "${smoke[@]}")
    grep -Ev "${pattern%|}" "$list" >"$list.nested" && mv -- "$list.nested" "$list"
fi

# Each binary runs in a machine of its own, in its package's directory as cargo would run it,
# on the machine's first CPU with every process it starts (its VMs' vCPU and device threads
# among them): an interrupt sent from the other CPU to one running a guest is what TCG's
# emulated SVM gets wrong (resources/README.md, "The nested-KVM test machine"). A machine of
# its own per binary keeps what one wedge costs to that binary.
#
# A machine that stops making progress is stopped by its heartbeat watchdog or --timeout, or
# by its own kernel's soft-lockup panic (nested-kvm.sh): status 124 or 125 (seen: a CPU that
# never came back from its guest for the rest of the hour; a stack guard page hit in
# exc_page_fault on a vCPU thread; both CPUs in soft lockup). The binary then runs again in a
# fresh machine, at most twice. A binary that fails runs once more and says so
# (`==> FLAKY: NAME`); the log keeps only each binary's last run for the counts.
run_nested() {
    local dir=$1 exe=$2
    shift 2
    resources/nested-kvm.sh --timeout "$machine_timeout" -- \
        env -C "$dir" CARGO_MANIFEST_DIR="$dir" \
        timeout -k 10 "$binary_timeout" taskset -c 0 "$exe" "$@" 2>&1 | tee -a "$log"
    return "${PIPESTATUS[0]}"
}
echo "==> running $(wc -l <"$list") integration-test binaries on the nested KVM, each in its own machine"
failed=()
passed=0
while IFS=$'\t' read -r dir name exe; do
    echo
    echo "     Running $name ($exe)" | tee -a "$log"
    start=$SECONDS
    mark=$(stat -c %s "$log")
    wedges=0
    flaky=0
    while :; do
        rc=0
        run_nested "$dir" "$exe" "$@" </dev/null || rc=$?
        if ((rc == 124 || rc == 125)) && ((wedges < 2)); then
            wedges=$((wedges + 1))
            echo "==> the nested machine hung or died under $name (status $rc): once more, in a new one"
        elif ((rc != 0)) && ((flaky == 0)); then
            flaky=1
            echo "==> FLAKY: $name failed (status $rc); running it once more"
        else
            break
        fi
        truncate -s "$mark" "$log"
    done
    if ((rc == 0)); then passed=$((passed + 1)); else failed+=("$name"); fi
    echo "     $name took $((SECONDS - start)) s"
done <"$list"
echo
echo "==> test binaries on the nested KVM: ${passed} passed${failed:+, failed: ${failed[*]}}"
((${#failed[@]} == 0)) || status=1
summary
exit "$status"
