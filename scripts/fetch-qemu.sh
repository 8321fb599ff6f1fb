#!/usr/bin/env bash
# Download Debian 13's qemu source package into build/cache and print the
# path of its pristine upstream tarball (Debian's own patches are not used).
. "$(dirname "$0")/lib.sh"
load_base

mkdir -p "$CACHE"
# Only trixie is configured as deb-src, so every source record is trixie's.
avail=$(apt-cache showsrc qemu 2>/dev/null | awk '/^Version:/ {print $2}' |
        sort -V | tail -n 1)
[ -n "$avail" ] || die "no qemu source in the apt indexes: run scripts/install-deps.sh"

upstream=${avail#*:}; upstream=${upstream%%+*}
case $upstream in
10.0.*) ;;
*) die "trixie now has qemu $avail, not a 10.0.x release: update qemu-base.conf by hand" ;;
esac
if [ "$avail" != "$DEBIAN_VERSION" ]; then
    cat >&2 <<MSG
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!! The archive has qemu $avail; qemu-base.conf records $DEBIAN_VERSION.
!!! Building QEMU $upstream instead of $UPSTREAM_VERSION. If the series still
!!! applies and passes, record the new base in qemu-base.conf.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
MSG
fi

tarball=$CACHE/qemu_${upstream}+ds.orig.tar.xz
if [ ! -f "$tarball" ]; then
    log "downloading qemu $avail source package"
    (cd "$CACHE" && apt-get source -q --download-only qemu/trixie >/dev/null 2>&1) ||
        die "apt-get source qemu=$avail failed"
fi
[ -f "$tarball" ] || die "$tarball not found after download"

if [ "$avail" = "$DEBIAN_VERSION" ]; then
    sum=$(sha256sum "$tarball" | cut -d' ' -f1)
    [ "$sum" = "$ORIG_SHA256" ] || die "$tarball: sha256 $sum, expected $ORIG_SHA256"
fi
echo "$tarball"
