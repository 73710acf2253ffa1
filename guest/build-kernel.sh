#!/bin/bash
# Build a minimal Linux for minivmm from Debian's linux-source-6.1 tarball.
#
#   guest/build-kernel.sh minimal  OUTDIR   -> OUTDIR/bzImage, OUTDIR/vmlinux
#   guest/build-kernel.sh emulated OUTDIR   -> OUTDIR/vmlinux-emulated
#   guest/build-kernel.sh acpi     OUTDIR   -> OUTDIR/vmlinux-acpi
#
# Config: `make tinyconfig`, merge guest/linux/minimal.config (and, for
# "emulated", guest/linux/emulated.config), `make olddefconfig`, then check
# that every fragment line survived. "emulated" also applies
# guest/linux/patches/*.patch (for hosts whose KVM emulates guest kernel code,
# REFERENCE.md §1). "acpi" is "emulated" plus guest/linux/acpi.config.
# The source is extracted into the cache, never the repo.
#
# Environment: MINIVMM_CACHE (cache root), MINIVMM_JOBS (make -j, default 2),
# MINIVMM_KEEP_BUILD=1 keeps the build tree in the cache (about 1.5 GB).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
. "$here/cache.sh"

[ $# -eq 2 ] || die "usage: $0 minimal|emulated|acpi OUTDIR"
variant=$1
outdir=$2
case $variant in
minimal)
    fragments=("$here/linux/minimal.config")
    patches=()
    ;;
emulated)
    fragments=("$here/linux/minimal.config" "$here/linux/emulated.config")
    patches=("$here"/linux/patches/*.patch)
    [ -e "${patches[0]}" ] || die "no patches in $here/linux/patches"
    ;;
acpi)
    fragments=("$here/linux/minimal.config" "$here/linux/emulated.config"
               "$here/linux/acpi.config")
    patches=("$here"/linux/patches/*.patch)
    ;;
*) die "unknown variant '$variant' (minimal, emulated or acpi)" ;;
esac

tarball=/usr/src/linux-source-6.1.tar.xz
[ -f "$tarball" ] || die "$tarball missing; install the Debian package linux-source-6.1"
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null) ||
    die "linux-source-6.1 is not installed (dpkg); install it"
for tool in gcc:gcc make:make flex:flex bison:bison bc:bc xz:xz-utils \
    perl:perl patch:patch; do
    need "${tool%%:*}" "${tool#*:}"
done
[ -f /usr/include/libelf.h ] || die "libelf.h missing; install the Debian package libelf-dev"
[ -f /usr/include/openssl/ssl.h ] || die "openssl headers missing; install the Debian package libssl-dev"

key=$(
    {
        echo "variant $variant"
        echo "linux-source-6.1 $srcver"
        gcc --version | head -n1
        ld --version | head -n1
    } | cache_key "linux-$variant" "$0" "$here/cache.sh" "${fragments[@]}" ${patches[@]+"${patches[@]}"}
)
entry=$MINIVMM_CACHE/$key

link_results() {
    if [ "$variant" = minimal ]; then
        link_out "$entry" bzImage "$outdir/bzImage"
        link_out "$entry" vmlinux "$outdir/vmlinux"
    else
        link_out "$entry" vmlinux "$outdir/vmlinux-$variant"
    fi
}

if [ -f "$entry/.done" ]; then
    link_results
    echo "kernel ($variant): cached $entry"
    exit 0
fi

mkdir -p "$MINIVMM_CACHE"
# One build of a given entry at a time; a second caller waits, then links.
exec 9>"$entry.lock"
flock 9
if [ -f "$entry/.done" ]; then
    link_results
    exit 0
fi

rm -rf "$entry"
mkdir -p "$entry"
src=$entry/build
mkdir -p "$src"
echo "kernel ($variant): extracting $tarball into $src"
tar -xJf "$tarball" -C "$src" --strip-components=1

for p in ${patches[@]+"${patches[@]}"}; do
    echo "kernel ($variant): applying $(basename "$p")"
    patch -d "$src" -p1 --forward --batch <"$p" >/dev/null ||
        die "patch $(basename "$p") does not apply to linux-source-6.1 $srcver"
done

export ARCH=x86_64 KBUILD_BUILD_USER=minivmm KBUILD_BUILD_HOST=minivmm
kmake() { make -C "$src" -s "$@"; }

kmake tinyconfig >/dev/null
(cd "$src" && scripts/kconfig/merge_config.sh -m .config "${fragments[@]}" >/dev/null)
kmake olddefconfig >/dev/null

# Every fragment line must have survived olddefconfig (a dependency that is
# missing silently drops an option otherwise).
lost=()
while IFS= read -r line; do
    case $line in
    "# CONFIG_"*" is not set")
        opt=${line#"# "}
        opt=${opt%" is not set"}
        if grep -q "^$opt=" "$src/.config"; then
            lost+=("$line (now: $(grep "^$opt=" "$src/.config"))")
        fi
        ;;
    CONFIG_*=*)
        if ! grep -qxF "$line" "$src/.config"; then
            opt=${line%%=*}
            now=$(grep -E "^$opt=|^# $opt is not set" "$src/.config" || echo "absent")
            lost+=("$line (now: $now)")
        fi
        ;;
    esac
done < <(cat "${fragments[@]}")
if [ ${#lost[@]} -gt 0 ]; then
    echo "kernel ($variant): config lines lost after olddefconfig:" >&2
    printf '  %s\n' "${lost[@]}" >&2
    die "fix guest/linux/*.config (a dependency is probably missing)"
fi

jobs=${MINIVMM_JOBS:-2}
echo "kernel ($variant): make -j$jobs bzImage vmlinux (about 7 minutes on 2 cores)"
start=$(date +%s)
kmake -j"$jobs" bzImage vmlinux >"$entry/build.log" 2>&1 || {
    tail -n 40 "$entry/build.log" >&2
    die "kernel build failed; full log in $entry/build.log"
}
echo "kernel ($variant): built in $(($(date +%s) - start)) s"

cp "$src/.config" "$entry/config"
cp "$src/vmlinux" "$entry/vmlinux"
[ "$variant" = minimal ] && cp "$src/arch/x86/boot/bzImage" "$entry/bzImage"
# PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 18) present?
readelf -n "$entry/vmlinux" | grep -E '^ *Xen ' | grep -qE '\(0x0*12\)|PHYS32' ||
    die "vmlinux has no PVH note (XEN_ELFNOTE_PHYS32_ENTRY); is CONFIG_PVH set?"
[ "${MINIVMM_KEEP_BUILD:-0}" = 1 ] || rm -rf "$src"
touch "$entry/.done"
link_results
