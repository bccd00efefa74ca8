#!/usr/bin/env bash
# Builds every guest artifact rvmm's tests and `rvmm run` use, each cached on its own (see
# lib.sh): the project's guest (build-guest.sh), the container-host guest
# (build-container-guest.sh), Debian's stock cloud kernel (build-stock-guest.sh) and the
# nested-KVM test machine (build-nested-kvm.sh).
# Progress goes to stderr; stdout carries only build-guest.sh's directory, so
# `dir=$(resources/build-all.sh)` works. Options (--force) go to every script.
set -euo pipefail
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
dir=$("$here/build-guest.sh" "$@")
"$here/build-container-guest.sh" "$@" >/dev/null
"$here/build-stock-guest.sh" "$@" >/dev/null
"$here/build-nested-kvm.sh" "$@" >/dev/null
printf '%s\n' "$dir"
