#!/usr/bin/env bash
# Runs every fuzz target (fuzz/src/bin/*.rs) for a fixed time from its seeds and fails on the
# first crash or hang. Usage: fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
# Findings go to target/fuzz/artifacts/<target>/; the grown corpus to target/fuzz/corpus/.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-20}
shift || true
if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for src in fuzz/src/bin/*.rs; do
        targets+=("$(basename "$src" .rs)")
    done
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# No sanitizer (the only mode stable rustc allows; the targets are safe Rust over guest
# memory), debug assertions on so that arithmetic overflow panics instead of wrapping.
opts=(--sanitizer none --debug-assertions)
cargo fuzz build "${opts[@]}"

summary=()
for t in "${targets[@]}"; do
    corpus=target/fuzz/corpus/$t
    artifacts=target/fuzz/artifacts/$t
    mkdir -p "$corpus" "$artifacts"
    log=target/fuzz/$t.log
    echo "==> fuzzing $t for ${seconds}s"
    # -timeout: an input taking over 10 s is a hang, reported like a crash.
    if ! cargo fuzz run "${opts[@]}" "$t" "$corpus" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "FAIL $t: crash or hang; reproducer in $artifacts/" >&2
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1)
    summary+=("$t: $runs executions, $cov, no crash")
done
printf '%s\n' "${summary[@]}"
