#!/bin/bash
# Build the hardware-virtualization tier's L1 artifacts from Debian packages only.
#
#   guest/hwvirt/build.sh OUTDIR -> OUTDIR/hwvirt/vmlinuz              Debian's stock kernel
#                                   OUTDIR/hwvirt/initramfs-l1.cpio    L1's /init (init-l1)
#                                   OUTDIR/hwvirt/initramfs-stock.cpio the stock kernel as a
#                                                                      minivmm guest (init-stock)
#                                   OUTDIR/hwvirt/modules/<kver>/      its module tree, pruned:
#                                        modules.dep, modules.builtin and the virtio and
#                                        vsock modules (`minivmm exec --modules`)
#
# The kernel is the linux-image-6.1.0-N-amd64-unsigned that linux-image-amd64 depends
# on, resolved now (`apt-get update` first if apt does not know it), fetched with
# `apt-get download` and unpacked with dpkg-deb -x; depmod -b gives modules.dep and
# modules.py the load order. Both initramfs images hold busybox-static (a few applets)
# and the modules they load; initramfs-stock.cpio also holds the check /init
# (guest/initramfs/check-init.c, compiled as build-initramfs.sh does).
#
# Cached in $MINIVMM_CACHE/hwvirt-<hash> over the resolved package and version, the
# busybox-static version, gcc, and this directory's scripts (README "guest/").
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
guest=$(dirname "$here")
. "$guest/cache.sh"

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
outdir=$1
for tool in apt-get:apt apt-cache:apt dpkg-deb:dpkg depmod:kmod gcc:gcc python3:python3; do
    need "${tool%%:*}" "${tool#*:}"
done
busybox=/bin/busybox
busybox_version=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null) ||
    die "busybox-static is not installed; install the Debian package busybox-static"
readelf -l "$busybox" 2>/dev/null | grep -q INTERP &&
    die "$busybox is not statically linked; install the Debian package busybox-static"

# The kernel package linux-image-amd64 points at, e.g. linux-image-6.1.0-57-amd64.
resolve() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1
}
image=$(resolve)
if [ -z "$image" ] || [ -z "$(apt-cache policy "$image-unsigned" 2>/dev/null |
    sed -n 's/^ *Candidate: \([^(]\)/\1/p')" ]; then
    echo "hwvirt: apt does not know linux-image-amd64's kernel; apt-get update"
    apt-get update -qq || die "apt-get update failed"
    image=$(resolve)
fi
[ -n "$image" ] || die "cannot resolve the kernel linux-image-amd64 depends on"
package=$image-unsigned
version=$(apt-cache policy "$package" | sed -n 's/^ *Candidate: //p')
[ -n "$version" ] && [ "$version" != "(none)" ] || die "no candidate version of $package"
kver=${image#linux-image-}

CFLAGS=(-static -Os -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie
    -fno-asynchronous-unwind-tables -Wl,--build-id=none -Wall -Wextra -Werror)
key=$(
    {
        echo "$package $version"
        echo "busybox-static $busybox_version"
        gcc --version | head -n1
        echo "${CFLAGS[*]}"
    } | cache_key hwvirt "$0" "$guest/cache.sh" "$guest/mkcpio.py" "$here/modules.py" \
        "$guest/../minivmm/kmod.py" \
        "$here/init-l1" "$here/init-stock" "$guest/initramfs/check-init.c" \
        "$guest/initramfs/freestanding.h"
)
entry=$MINIVMM_CACHE/$key
results=(vmlinuz initramfs-l1.cpio initramfs-stock.cpio)
link_results() {
    for f in "${results[@]}"; do
        link_out "$entry" "$f" "$outdir/hwvirt/$f"
    done
    [ -d "$entry/modules" ] || die "cache entry $entry lacks modules/; delete it and rebuild"
    ln -sfn "$entry/modules" "$outdir/hwvirt/modules"
    echo "$package $version" >"$outdir/hwvirt/.kernel-package.tmp"
    mv "$outdir/hwvirt/.kernel-package.tmp" "$outdir/hwvirt/kernel-package"
}
if [ -f "$entry/.done" ]; then
    link_results
    echo "hwvirt: cached $entry ($package $version)"
    exit 0
fi

mkdir -p "$MINIVMM_CACHE"
exec 9>"$entry.lock"
flock 9
if [ -f "$entry/.done" ]; then
    link_results
    exit 0
fi
tmp=$(mktemp -d "$MINIVMM_CACHE/.$key.XXXXXX")
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
echo "hwvirt: apt-get download $package=$version"
(cd "$tmp" && apt-get download -q "$package=$version" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
deb=$(ls "$tmp"/"$package"_*.deb 2>/dev/null | head -n1)
[ -n "$deb" ] || die "apt-get download $package=$version gave no .deb"
dpkg-deb -x "$deb" "$tmp/pkg"
rm -f "$deb"
mods=$tmp/pkg/lib/modules/$kver
[ -f "$tmp/pkg/boot/vmlinuz-$kver" ] && [ -d "$mods" ] || die "$package lacks vmlinuz-$kver or its modules"
depmod -b "$tmp/pkg" "$kver"
cp "$tmp/pkg/boot/vmlinuz-$kver" "$tmp/vmlinuz"

# mkcpio spec for busybox with the given applets, the modules of modules.py's list
# (written to /modules.list as "<file> [params]"), and /init.
initramfs() {  # initramfs NAME INIT APPLETS MODULE...
    local name=$1 init=$2 applets=$3
    shift 3
    local spec=$tmp/$name.spec list=$tmp/$name.modules
    python3 "$here/modules.py" "$mods" "$@" >"$list.full"
    : >"$list"
    {
        printf 'dir /%s 0755\n' dev proc sys bin lib lib/modules
        echo "nod /dev/console 0600 c 5 1"
        echo "dir /tmp 1777"
        echo "file /bin/busybox 0755 $busybox"
        for a in $applets; do echo "slink /bin/$a 0777 busybox"; done
        echo "file /init 0755 $init"
        while read -r path params; do
            file=$(basename "$path")
            echo "file /lib/modules/$file 0644 $mods/$path"
            echo "$file $params" >>"$list"
        done <"$list.full"
        echo "file /modules.list 0644 $list"
    } >"$spec"
    if [ "$name" = initramfs-stock ]; then
        # powers off at the end (ACPI S5): the stock kernel has ACPI
        gcc "${CFLAGS[@]}" -DCHECK_POWER_OFF -o "$tmp/check-init" \
            "$guest/initramfs/check-init.c"
        echo "file /check-init 0755 $tmp/check-init" >>"$spec"
    fi
    python3 "$guest/mkcpio.py" "$spec" "$tmp/$name.cpio"
    mv "$spec" "$tmp/$name.spec.txt"
    mv "$list" "$tmp/$name.modules.txt"
    rm -f "$list.full"
}
initramfs initramfs-l1 "$here/init-l1" "sh mount umount insmod mkdir chroot poweroff sync stty cat" \
    virtio_pci virtio_console 9pnet_virtio 9p overlay kvm ccp kvm_amd=nested=1,npt=1 tun
initramfs initramfs-stock "$here/init-stock" "sh mount insmod ip ping timeout" \
    virtio_mmio virtio_blk virtio_rng virtio_console virtio_net
# The module tree minivmm exec reads for the stock kernel (tests/hwvirt/test_exec.py):
# depmod's index files and the module directories its vsock driver comes from.
tree=$tmp/modules/$kver
mkdir -p "$tree"
cp "$mods"/modules.dep "$mods"/modules.builtin "$mods"/modules.order "$tree/"
for d in kernel/drivers/virtio kernel/net/vmw_vsock; do
    mkdir -p "$tree/$d"
    cp -r "$mods/$d/." "$tree/$d/"
done
rm -rf "$tmp/pkg"
echo "$package $version" >"$tmp/kernel-package"
touch "$tmp/.done"
rm -rf "$entry"
mv "$tmp" "$entry"
trap - EXIT
link_results
echo "hwvirt: built $entry ($package $version)"
