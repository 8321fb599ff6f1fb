#!/usr/bin/env bash
# The libvirt suite: Debian's libvirt drives the patched QEMU
# (build/patched-O0), through tests/libvirt/suite.py [CASE...].
# Installs libvirt (11.3 from bookworm-backports, the libvirt of Debian 13;
# LIBVIRT_RELEASE=bookworm for Debian 12's own 9.0), and runs the suite as
# an unprivileged user (created if missing) with its own session daemons;
# ends with "N passed, N failed".
. "$(dirname "$0")/lib.sh"

LIBVIRT_RELEASE=${LIBVIRT_RELEASE:-bookworm-backports}
LIBVIRT_PKGS="libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients"
TEST_USER=qemu-libvirt-test
# QEMU_BUILD=build/stock-O0 runs it against the unpatched build (make stock)
BUILD_DIR=$(cd "${QEMU_BUILD:-$(build_dir patched 0)}" && pwd)

[ -x "$BUILD_DIR/qemu-system-x86_64" ] || die "no QEMU build in $BUILD_DIR: run make"
# PKG/RELEASE: that release's version; install-deps.sh never downgrades, so
# LIBVIRT_RELEASE=bookworm after 11.3 stops: apt-get remove libvirt first
pkgs=()
for p in $LIBVIRT_PKGS; do pkgs+=("$p/$LIBVIRT_RELEASE"); done
"$TOP/scripts/install-deps.sh" "${pkgs[@]}"

if [ "$(id -u)" = 0 ]; then
    if ! id -u "$TEST_USER" >/dev/null 2>&1; then
        log "creating the unprivileged user $TEST_USER"
        useradd --system --create-home --home-dir "/var/lib/$TEST_USER" \
            --shell /usr/sbin/nologin "$TEST_USER"
    fi
    as_user() { runuser -u "$TEST_USER" -- env HOME="/var/lib/$TEST_USER" "$@"; }
else
    TEST_USER=$(id -un)
    as_user() { "$@"; }
fi

WORK=$(mktemp -d /tmp/qlv.XXXXXX)    # short: UNIX socket paths below
LOGS=${LIBVIRT_LOGS:-$BUILD/libvirt-logs}   # the last run's logs, a directory a case
chown "$TEST_USER" "$WORK"
cleanup() {
    # The suite stops what it started and checks after each case that
    # nothing is left; this is the safety net for a suite that was itself
    # killed.  libvirtd, the NBD targets and virsh die with the suite
    # (PR_SET_PDEATHSIG), libvirt's QEMUs do not: they name $WORK in their
    # command lines.  As root, the test user has nothing else to lose.
    # SIGCONT first, for a target the suite froze.
    local which=(-f -- "$WORK/")
    [ "$TEST_USER" = "$(id -un)" ] || which=()
    pkill -CONT -u "$TEST_USER" "${which[@]}" || true
    pkill -KILL -u "$TEST_USER" "${which[@]}" || true
    if [ -d "$WORK/logs" ]; then
        rm -rf "$LOGS"
        cp -r "$WORK/logs" "$LOGS" || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP    # so that cleanup runs then too

log "libvirt suite ($(libvirtd --version)) as $TEST_USER; logs in $LOGS"
as_user "$PYTHON" "$TOP/tests/libvirt/suite.py" "$WORK" "$BUILD_DIR" \
    "$TREE/python" "$@"
