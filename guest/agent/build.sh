#!/bin/bash
# Build the guest agent (guest/agent/agent.c + proto.c + modload.c + tree.c, static against the host's libc):
#
#   guest/agent/build.sh OUTDIR -> OUTDIR/minivmm-agent
#
# `minivmm exec` packs it as /init into the cpio archive it appends to the
# initramfs. Cached in $MINIVMM_CACHE/agent-<hash of inputs>.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
. "$here/../cache.sh"

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
outdir=$1
need gcc gcc
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || [ -n "$(gcc -print-file-name=libc.a | grep /)" ] ||
    die "no static libc; install the Debian package libc6-dev"
CFLAGS=(-static -O2 -Wall -Wextra -Werror -fno-asynchronous-unwind-tables -Wl,--build-id=none)
version="$(gcc --version | head -n1) $(dpkg-query -W -f='${Version}' libc6-dev 2>/dev/null || true) ${CFLAGS[*]}"
key=$(echo "$version" | cache_key agent "$0" "$here/../cache.sh" "$here/agent.h" "$here/agent.c" "$here/proto.c" "$here/modload.c" "$here/tree.c")
entry=$MINIVMM_CACHE/$key
if [ -f "$entry/.done" ]; then
    link_out "$entry" minivmm-agent "$outdir/minivmm-agent"
    echo "agent: cached $entry"
    exit 0
fi

mkdir -p "$MINIVMM_CACHE"
tmp=$(mktemp -d "$MINIVMM_CACHE/.$key.XXXXXX")
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
gcc "${CFLAGS[@]}" -o "$tmp/minivmm-agent" "$here/agent.c" "$here/proto.c" "$here/modload.c" "$here/tree.c"
strip "$tmp/minivmm-agent"
touch "$tmp/.done"
rm -rf "$entry"
mv "$tmp" "$entry"
trap - EXIT
link_out "$entry" minivmm-agent "$outdir/minivmm-agent"
echo "agent: built $entry/minivmm-agent"
