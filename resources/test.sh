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
runner=$(mktemp)
trap 'rm -f -- "$log" "$list" "$runner"' EXIT

# shellcheck source=kvm-platform.sh
source resources/kvm-platform.sh

# A test binary's limit inside the nested machine (the longest, oci, takes ~6 min), and the whole
# machine's (the layer takes ~30 min).
binary_timeout=900
machine_timeout=3600

# The smoke layer: what must keep working on an emulating KVM.
smoke=(tiny_guests hostile_guest seccomp bad_input linux_smoke)

# Prints "tests: N passed, M failed" over every `test result:` line of the log.
summary() {
    # A binary run once more (see the runner) counts only its last run.
    awk '/^     Running / { lp = 0; lf = 0 }
         /^test result: / {
            for (i = 1; i < NF; i++) {
                if ($(i + 1) ~ /^passed;?$/) { p += $i; lp = $i }
                if ($(i + 1) ~ /^failed;?$/) { f += $i; lf = $i }
            }
         }
         /^==> FLAKY: / { p -= lp; f -= lf }
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

# What runs inside: each binary in its package's directory, as cargo would run it, on the
# machine's first CPU with every process it starts (its VMs' vCPU and device threads among
# them): an interrupt sent from the other CPU to one running a guest is what TCG's emulated SVM
# gets wrong (resources/README.md, "The nested-KVM test machine"). Then a summary
# line at the end, and status 1 when any binary failed. A binary that fails is run once more
# and says so (`==> FLAKY: NAME`): one virtiofs test failed once in about eight runs here, its
# rvmm ending early in the guest's boot with nothing on stderr, not yet understood.
{
    echo 'failed=(); passed=0'
    while IFS=$'\t' read -r dir name exe; do
        printf 'echo; echo "     Running %s (%s)"\n' "$name" "$exe"
        printf 'start=$SECONDS\n'
        printf 'run() { (cd %q && CARGO_MANIFEST_DIR=%q timeout -k 10 %s taskset -c 0 %q' \
            "$dir" "$dir" "$binary_timeout" "$exe"
        printf ' %q' "$@"
        printf '); }\n'
        printf 'if run || { echo "==> FLAKY: %s failed; running it once more"; ' "$name"
        printf 'echo "     Running %s again"; run; }; then\n' "$name"
        printf '    passed=$((passed + 1))\nelse\n    failed+=(%q)\nfi\n' "$name"
        printf 'echo "     %s took $((SECONDS - start)) s"\n' "$name"
    done <"$list"
    echo 'echo; echo "==> test binaries on the nested KVM: ${passed} passed${failed:+, failed: ${failed[*]}}"'
    echo '((${#failed[@]} == 0))'
} >"$runner"

# A nested machine that stops making progress is stopped by --timeout (124), or by its own
# kernel's soft-lockup panic (nested-kvm.sh), and one that dies under its command ends with 125
# (seen: the nested machine's kernel hit a stack guard page in exc_page_fault on a vCPU thread,
# a %gs-relative read faulting again and again, under TCG's emulated SVM; and both of its CPUs
# in soft lockup). Either way the layer runs again in a fresh machine, at most twice; the log
# keeps only the last try's counts.
nested_layer() {
    resources/nested-kvm.sh --timeout "$machine_timeout" -- bash "$runner" 2>&1 | tee -a "$log"
    return "${PIPESTATUS[0]}"
}
echo "==> running $(wc -l <"$list") integration-test binaries on the nested KVM"
mark=$(stat -c %s "$log")
nested=0
nested_layer || nested=$?
for _ in 1 2; do
    ((nested == 124 || nested == 125)) || break
    echo "==> the nested machine hung or died (status $nested): once more, in a new one"
    truncate -s "$mark" "$log"
    nested=0
    nested_layer || nested=$?
done
((nested == 0)) || status=1
summary
exit "$status"
