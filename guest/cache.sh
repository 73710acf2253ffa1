# Shared helpers for guest/build-*.sh (sourced, not executed).
#
# Results live outside the clone in $MINIVMM_CACHE (default
# ~/.cache/minivmm), one directory per <name>-<hash of inputs>, so a second
# `make guest`, even from a fresh clone, only links the cached files into
# guest/out/. A directory is complete when it holds the file `.done`.

MINIVMM_CACHE=${MINIVMM_CACHE:-$HOME/.cache/minivmm}

die() {
    echo "$(basename "$0"): $*" >&2
    exit 1
}

need() {  # need CMD PACKAGE: fail with the Debian package to install
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found; install the Debian package $2"
}

# cache_key NAME FILE...: prints NAME-<16 hex digits> over the files' names
# and contents plus whatever extra text is piped into stdin.
cache_key() {
    name=$1
    shift
    {
        cat
        for f in "$@"; do
            printf '\n== %s\n' "$(basename "$f")"
            cat "$f"
        done
    } | sha256sum | cut -c1-16 | sed "s/^/$name-/"
}

# link_out CACHEDIR FILE OUTPATH: point guest/out/<...> at the cached file.
link_out() {
    [ -f "$1/$2" ] || die "cache entry $1 lacks $2; delete that directory and rebuild"
    mkdir -p "$(dirname "$3")"
    ln -sfn "$1/$2" "$3"
}
