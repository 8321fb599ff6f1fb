#!/usr/bin/env bash
# Install what building and testing need, from Debian packages only:
#  - Debian 12: bookworm, with its bookworm-updates and bookworm-security;
#  - bookworm-backports only for packages built from BACKPORT_SOURCES
#    (meson >= 1.5 for the build, libvirt 11.3 for check-libvirt.sh), with
#    what they strictly need from there (apt's PKG/bookworm-backports takes
#    a dependency from backports only if Debian 12's version cannot do);
#  - Debian 13 (trixie) as deb-src only, for `apt-get source qemu` (never as deb).
# Every installation is simulated first and refused if it would downgrade or
# remove a package, take one from outside Debian 12, or take from backports
# one not built from BACKPORT_SOURCES.
# Idempotent: does nothing when everything is present.
# Arguments: more packages; PKG/RELEASE (RELEASE bookworm or
# bookworm-backports, e.g. libvirt-daemon/bookworm-backports) wants that
# release's version (bookworm: the newest of Debian 12's suites, a security
# update included); one that is installed in a newer version is refused, not
# downgraded.
. "$(dirname "$0")/lib.sh"

# Build: compiler tool chain, QEMU's host libraries, firmware for the PC machine.
BUILD_PKGS="build-essential git ccache ninja-build pkg-config flex bison
 python3 python3-venv python3-tomli xz-utils dpkg-dev
 libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev libzstd-dev
 libaio-dev liburing-dev libnbd-dev libgnutls28-dev seabios qemu-system-data"
# Tests and fault injection.
TEST_PKGS="nbdkit python3-libnbd procps gnutls-bin python3-hypothesis"

DEBIAN12_SUITES="bookworm bookworm-updates bookworm-security"
BACKPORTS=bookworm-backports
# Source packages whose binaries may come from bookworm-backports
BACKPORT_SOURCES="meson libvirt"

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

# (No `| grep -q` or `| awk '... exit'` below: under pipefail, the writer's
# SIGPIPE when the reader stops early would fail the pipeline.)

# versions PKG...: "PKG VERSION SUITE" for each binary package the indexes
# offer (one apt-cache for all: each takes half a second).
versions() {
    apt-cache madison "$@" 2>/dev/null |
        awk -F' [|] ' '$3 ~ / Packages$/ {
            gsub(/ /, "", $1); gsub(/ /, "", $2)
            split($3, w, " "); sub("/.*", "", w[2])
            print $1, $2, w[2] }'
}

# installed PKG: its installed version, or nothing.
installed() {
    local s
    s=$(dpkg-query -W -f='${db:Status-Status} ${Version}' "$1" 2>/dev/null) ||
        return 0
    if [ "${s%% *}" = installed ]; then echo "${s#* }"; fi
}

# newest: the newest of the versions on stdin (Debian's ordering).
newest() {
    local v best=
    while read -r v; do
        if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then
            best=$v
        fi
    done
    echo "$best"
}

# in_list WORD LIST: WORD is one of LIST's (blank-separated)
in_list() { case " $2 " in *" $1 "*) return 0 ;; esac; return 1; }
# any_in WORDS LIST: one of WORDS is in LIST
any_in() { local w; for w in $1; do in_list "$w" "$2" && return 0; done; return 1; }

# wanted PKG RELEASE: the version of PKG that RELEASE offers.
wanted() {
    local suites=$2
    [ "$2" = bookworm ] && suites=$DEBIAN12_SUITES
    versions "$1" | while read -r _ v s; do
        if in_list "$s" "$suites"; then echo "$v"; fi
    done | newest
}

# missing PKG...: those to install, as apt-get takes them (PKG, or
# PKG/bookworm-backports); dies if one would have to be downgraded.
missing() {
    local p name release want have
    for p in "$@"; do
        case $p in
        */*) name=${p%/*} release=${p#*/} ;;
        *) [ -n "$(installed "$p")" ] || echo "$p"; continue ;;
        esac
        in_list "$release" "bookworm $BACKPORTS" || die "$p: unknown release"
        # No version (no index of RELEASE before apt-get update): needed,
        # and if it is still unknown then, apt-get says so
        want=$(wanted "$name" "$release")
        have=$(installed "$name")
        [ -n "$want" ] && [ "$have" = "$want" ] && continue
        if [ -n "$want" ] && [ -n "$have" ] &&
                dpkg --compare-versions "$have" gt "$want"; then
            die "$name $have is installed, newer than $want from $release:" \
                "not downgrading it.  To have $release's, first remove" \
                "every package built from $(source_of "$name" "$have") in a" \
                "newer version than $release's: apt-get remove" \
                "$(newer_siblings "$name" "$have" "$release")"
        fi
        # Plain name for bookworm: apt's candidate is Debian 12's newest
        # (backports have priority 100), a security update included
        if [ "$release" = bookworm ]; then echo "$name"; else echo "$p"; fi
    done
}

# source_of PKG VERSION: the source package it is built from.
source_of() {
    apt-cache show "$1=$2" 2>/dev/null |
        awk -v p="$1" '!s && /^Source:/ {s = $2} END {print s ? s : p}'
}

# newer_siblings PKG VERSION RELEASE: the installed packages built from the
# same source as PKG VERSION (PKG among them) in a newer version than
# RELEASE offers (or in one RELEASE does not have): what stands in the way
# of RELEASE's version of PKG (e.g. libvirt0 and libvirt-common for
# libvirt-daemon from bookworm after bookworm-backports' 11.3).
newer_siblings() {
    local src status name from have want
    src=$(source_of "$1" "$2")
    dpkg-query -W -f='${db:Status-Status} ${Package} ${source:Package} ${Version}\n' |
        while read -r status name from have; do
            if [ "$status" != installed ] || [ "$from" != "$src" ]; then
                continue
            fi
            want=$(wanted "$name" "$3")
            if [ -z "$want" ] || dpkg --compare-versions "$have" gt "$want"; then
                echo "$name"
            fi
        done | sort | tr '\n' ' ' | sed 's/ $//'
}

# check_plan PKG...: what `apt-get install PKG...` would do, refused (die)
# if it downgrades or removes a package, takes one from outside Debian 12,
# or takes from backports one not built from BACKPORT_SOURCES.
check_plan() {
    local plan inst offers='' name new old suites src bad=()
    plan=$(apt-get -s install --no-install-recommends "$@" 2>&1) ||
        die "apt-get cannot install $*: $plan"
    # "PKG NEW [OLD]" of each "Inst PKG [OLD] (NEW ORIGIN [ARCH])"
    inst=$(awk '$1 == "Inst" { old = ""; i = 3
                if ($3 ~ /^\[/) { old = substr($3, 2, length($3) - 2); i = 4 }
                print $2, substr($i, 2), old }' <<<"$plan")
    # shellcheck disable=SC2046
    [ -z "$inst" ] || offers=$(versions $(cut -d' ' -f1 <<<"$inst"))
    while read -r name new old; do
        [ -n "$name" ] || continue
        if [ -n "$old" ] && dpkg --compare-versions "$old" gt "$new"; then
            bad+=("$name would be downgraded from $old to $new")
        fi
        suites=$(awk -v p="$name" -v v="$new" \
                 '$1 == p && $2 == v {printf "%s ", $3}' <<<"$offers")
        if any_in "$suites" "$DEBIAN12_SUITES"; then
            continue
        elif in_list "$BACKPORTS" "$suites"; then
            src=$(source_of "$name" "$new")
            in_list "$src" "$BACKPORT_SOURCES" ||
                bad+=("$name $new would come from $BACKPORTS (source $src)")
        else
            bad+=("$name $new would come from outside Debian 12 (${suites:-no suite})")
        fi
    done <<<"$inst"
    while read -r name; do
        bad+=("$name would be removed")
    done < <(awk '$1 == "Remv" {print $2}' <<<"$plan")
    if [ ${#bad[@]} -gt 0 ]; then
        die "refusing to install $*:$(printf '\n  %s' "${bad[@]}")"
    fi
}

meson_recent() {
    command -v meson >/dev/null &&
        dpkg --compare-versions "$(meson --version)" ge 1.5
}

changed=0
write_source "$SRC_LIST" deb-src trixie && changed=1
write_source "$BPO_LIST" deb "$BACKPORTS" && changed=1

wants=("$@")
meson_recent || wants+=("meson/$BACKPORTS")
# shellcheck disable=SC2086
need=$(missing $BUILD_PKGS $TEST_PKGS "${wants[@]}")
# The deb-src index is needed by fetch-qemu.sh; check it is there.
srcs=$(apt-cache showsrc qemu 2>/dev/null || true)
grep -q '^Version: .*10\.0\.' <<<"$srcs" || changed=1

if [ -z "$need" ] && [ $changed = 0 ]; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
log "apt-get update"
apt-get update -q >/dev/null
# shellcheck disable=SC2086
need=$(missing $BUILD_PKGS $TEST_PKGS "${wants[@]}")   # with the new indexes
if [ -n "$need" ]; then
    # shellcheck disable=SC2086
    check_plan $need
    log "installing: $(tr '\n' ' ' <<<"$need")"
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends --no-remove $need >/dev/null
    # shellcheck disable=SC2086
    left=$(missing $BUILD_PKGS $TEST_PKGS "${wants[@]}")
    [ -z "$left" ] || die "still not as wanted after apt-get install: $left"
fi
