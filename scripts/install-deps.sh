#!/usr/bin/env bash
# Install what building and testing need, from Debian packages only:
#  - Debian 12 (bookworm) binary packages, plus bookworm-backports for meson >= 1.5
#  - Debian 13 (trixie) as deb-src only, for `apt-get source qemu` (never as deb)
# Idempotent: does nothing when everything is present.
# Arguments: more packages; PKG/RELEASE (e.g. libvirt-daemon/bookworm-backports)
# wants that release's version, installed (or up- or downgraded) with what it
# depends on from the same release.
. "$(dirname "$0")/lib.sh"

# Build: compiler tool chain, QEMU's host libraries, firmware for the PC machine.
BUILD_PKGS="build-essential git ccache ninja-build pkg-config flex bison
 python3 python3-venv python3-tomli xz-utils dpkg-dev
 libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev libzstd-dev
 libaio-dev liburing-dev libnbd-dev libgnutls28-dev seabios qemu-system-data"
# Tests and fault injection.
TEST_PKGS="nbdkit python3-libnbd procps gnutls-bin python3-hypothesis"
BACKPORT_PKGS="meson"

APT_DIR=/etc/apt/sources.list.d
SRC_LIST=$APT_DIR/qemu-series-trixie-src.sources
BPO_LIST=$APT_DIR/qemu-series-bookworm-backports.sources

# The Debian archive host the machine already uses (first URI that serves bookworm).
debian_mirror() {
    local uri
    uri=$(grep -hs -A3 '^URIs:' "$APT_DIR"/*.sources |
          awk '/^URIs:/ {u=$2} /^Suites:.*bookworm( |$)/ {print u; exit}')
    if [ -z "$uri" ]; then
        uri=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' \
              /etc/apt/sources.list "$APT_DIR"/*.list 2>/dev/null || true)
    fi
    [ -n "$uri" ] || die "cannot find the Debian archive host in the apt sources"
    echo "$uri"
}

# write_source FILE TYPE SUITE: one deb822 entry on the machine's own mirror.
write_source() {
    local file=$1 type=$2 suite=$3 mirror
    [ -f "$file" ] && return 1
    mirror=$(debian_mirror)
    log "adding $type $suite ($mirror) in $file"
    cat > "$file" <<EOS
# Added by qemu-block-series scripts/install-deps.sh
Types: $type
URIs: $mirror
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
}

missing() {
    local p
    for p in "$@"; do
        case $p in */*) release_differs "$p" && echo "$p"; continue ;; esac
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' ||
            echo "$p"
    done
}

# release_differs PKG/RELEASE: PKG is not installed in RELEASE's version.
release_differs() {
    local want have
    want=$(apt-cache madison "${1%/*}" 2>/dev/null |
           awk -F' [|] ' -v r=" ${1#*/}/" 'index($3, r) {print $2; exit}')
    have=$(dpkg-query -W -f='${Status} ${Version}\n' "${1%/*}" 2>/dev/null |
           awk '/^install ok installed / {print $4}')
    [ -z "$want" ] || [ "$want" != "$have" ]
}

meson_recent() {
    command -v meson >/dev/null &&
        dpkg --compare-versions "$(meson --version)" ge 1.5
}

changed=0
write_source "$SRC_LIST" deb-src trixie && changed=1
write_source "$BPO_LIST" deb bookworm-backports && changed=1

# shellcheck disable=SC2086
need=$(missing $BUILD_PKGS $TEST_PKGS "$@")
meson_recent || need_bpo=$BACKPORT_PKGS
# The deb-src index is needed by fetch-qemu.sh; check it is there.
apt-cache showsrc qemu 2>/dev/null | grep -q '^Version: .*10\.0\.' || changed=1

if [ -z "$need" ] && [ -z "${need_bpo:-}" ] && [ $changed = 0 ]; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
log "apt-get update"
apt-get update -q >/dev/null
if [ -n "${need_bpo:-}" ]; then
    log "installing from bookworm-backports: $need_bpo"
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends -t bookworm-backports $need_bpo >/dev/null
fi
if [ -n "$need" ]; then
    log "installing: $(echo $need)"
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends --allow-downgrades $need >/dev/null
fi
