#!/bin/bash
# Build the guest initramfs images (no root needed: guest/mkcpio.py writes
# the cpio, device nodes included).
#
#   guest/build-initramfs.sh busybox OUTDIR -> OUTDIR/initramfs.cpio
#       busybox-static, every applet linked, /init = guest/initramfs/init
#   guest/build-initramfs.sh check OUTDIR   -> OUTDIR/initramfs-check.cpio
#       one static /init built from guest/initramfs/check-init.c, no busybox
#   guest/build-initramfs.sh vsock OUTDIR   -> OUTDIR/initramfs-vsock.cpio
#       one static /init built from guest/initramfs/vsock-test.c (the guest side
#       of tests/test_linux_vsock.py)
#
# Cached in $MINIVMM_CACHE/initramfs-<kind>-<hash of inputs>.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
. "$here/cache.sh"

[ $# -eq 2 ] || die "usage: $0 busybox|check|vsock OUTDIR"
kind=$1
outdir=$2
need python3 python3
CFLAGS=(-static -Os -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie
    -fno-asynchronous-unwind-tables -Wl,--build-id=none -Wall -Wextra -Werror)

case $kind in
busybox)
    busybox=/bin/busybox
    [ -x "$busybox" ] || die "$busybox missing; install the Debian package busybox-static"
    # The dynamically linked busybox package would not run in the guest.
    if ! file -L "$busybox" 2>/dev/null | grep -q 'statically linked' &&
        readelf -l "$busybox" | grep -q INTERP; then
        die "$busybox is not statically linked; install the Debian package busybox-static"
    fi
    inputs=("$here/initramfs/init")
    version=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || sha256sum <"$busybox")
    result=initramfs.cpio
    ;;
check | vsock)
    need gcc gcc
    if [ "$kind" = check ]; then
        inputs=("$here/initramfs/check-init.c" "$here/initramfs/freestanding.h")
    else
        inputs=("$here/initramfs/vsock-test.c" "$here/initramfs/freestanding.h")
    fi
    version="$(gcc --version | head -n1) ${CFLAGS[*]}"
    result=initramfs-$kind.cpio
    ;;
*) die "unknown initramfs '$kind' (busybox, check or vsock)" ;;
esac

key=$(echo "$kind $version" | cache_key "initramfs-$kind" "$0" "$here/cache.sh" "$here/mkcpio.py" "${inputs[@]}")
entry=$MINIVMM_CACHE/$key
if [ -f "$entry/.done" ]; then
    link_out "$entry" "$result" "$outdir/$result"
    echo "initramfs ($kind): cached $entry"
    exit 0
fi

mkdir -p "$MINIVMM_CACHE"
tmp=$(mktemp -d "$MINIVMM_CACHE/.$key.XXXXXX")
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
spec=$tmp/spec
cat >"$spec" <<SPEC
dir /dev 0755
nod /dev/console 0600 c 5 1
dir /proc 0555
dir /sys 0555
dir /tmp 1777
SPEC

if [ "$kind" = busybox ]; then
    {
        echo "dir /bin 0755"
        echo "dir /sbin 0755"
        echo "dir /usr 0755"
        echo "dir /usr/bin 0755"
        echo "dir /usr/sbin 0755"
        echo "file /bin/busybox 0755 $busybox"
        echo "file /init 0755 $here/initramfs/init"
        "$busybox" --list-full | sort -u | while read -r applet; do
            [ "$applet" = bin/busybox ] && continue
            echo "slink /$applet 0777 /bin/busybox"
        done
    } >>"$spec"
else
    gcc "${CFLAGS[@]}" -o "$tmp/init" "${inputs[0]}"
    echo "file /init 0755 $tmp/init" >>"$spec"
fi

python3 "$here/mkcpio.py" "$spec" "$tmp/$result"
cp "$spec" "$tmp/spec.txt"
rm -f "$spec"
touch "$tmp/.done"
rm -rf "$entry"
mv "$tmp" "$entry"
trap - EXIT
link_out "$entry" "$result" "$outdir/$result"
echo "initramfs ($kind): built $entry/$result"
