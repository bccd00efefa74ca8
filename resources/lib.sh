# Shared by resources/build-*.sh (sourced, not run): messages, input hashing and the
# artifact cache under ${XDG_CACHE_HOME:-$HOME/.cache}/rvmm.
#
# A build script sets `name` (the artifact family, e.g. "guest") and then:
#   key=$(input_key "<package versions>" FILE_OR_DIR...)   # relative to resources/
#   cache_setup "$key"      # sets $out and $work; --print-dir/complete outputs exit here
#   ... build into $out, scratch in $work ...
#   cache_finish            # stamps $out complete, links $cache/$name, prints $out
# stdout carries only the output directory; progress goes to stderr.

resources=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/rvmm
start=$SECONDS

die() { echo "${name:-build}: error: $*" >&2; exit 1; }
step() { printf '==> [%4ss] %s\n' "$((SECONDS - start))" "$*" >&2; }
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }

# input_key TEXT PATH...: 16 hex digits over TEXT, lib.sh and every file under PATH...
input_key() {
    local text=$1 sum
    shift
    sum=$(
        cd -- "$resources"
        printf '%s\n' "$text"
        find lib.sh "$@" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    ) || die "cannot hash the inputs"
    sum=$(printf '%s\n' "$sum" | sha256sum)
    printf '%s\n' "${sum:0:16}"
}

# Repoint $cache/$name at the newest output atomically (rename over the old link), relative
# so that the cache directory can be moved.
link_latest() {
    if [[ $(readlink "$cache/$name" 2>/dev/null || true) != "$name-$key" ]]; then
        ln -sfn "$name-$key" "$cache/$name.tmp.$$"
        mv -T "$cache/$name.tmp.$$" "$cache/$name"
    fi
}

reuse_complete() {
    if ((!force)) && [[ -e $out/.complete ]]; then
        link_latest
        printf '%s\n' "$out"
        exit 0
    fi
}

# cache_setup KEY: honours $print_dir and $force; holds a per-family lock from here on, so
# parallel test jobs that all call the script build once.
cache_setup() {
    key=$1
    out=$cache/$name-$key
    work=$cache/work-$name-$key
    if ((print_dir)); then
        printf '%s\n' "$out"
        exit 0
    fi
    reuse_complete
    mkdir -p "$cache"
    exec 9>"$cache/.lock-$name"
    flock 9
    reuse_complete
    if ((force)); then
        rm -rf -- "$work"
    fi
    rm -rf -- "$out"
    mkdir -p "$work" "$out"
}

cache_finish() {
    touch "$out/.complete"
    link_latest
    rm -rf -- "$work"
    step "done: $(cd -- "$out" && echo *)"
    printf '%s\n' "$out"
}

# parse_build_args "$@": the options every build script takes.
parse_build_args() {
    print_dir=0
    force=0
    local arg
    for arg in "$@"; do
        case $arg in
            --print-dir) print_dir=1 ;;
            --force) force=1 ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; exit 2 ;;
        esac
    done
}
