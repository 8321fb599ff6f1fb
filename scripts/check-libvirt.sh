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
# The last run's logs of each case, in LOGS/CASE (LOGS: a directory of the
# suite's, marked by this file; another must be empty or new)
LOGS=${LIBVIRT_LOGS:-$BUILD/libvirt-logs}
LOGS_MARK=.qemu-libvirt-suite-logs

[ -x "$BUILD_DIR/qemu-system-x86_64" ] || die "no QEMU build in $BUILD_DIR: run make"
[ ! -e "$LOGS" ] || [ -d "$LOGS" ] || die "LIBVIRT_LOGS=$LOGS is not a directory"
if [ -n "${LIBVIRT_LOGS:-}" ] && [ -d "$LOGS" ] && [ ! -e "$LOGS/$LOGS_MARK" ] &&
        [ -n "$(ls -A "$LOGS")" ]; then
    die "LIBVIRT_LOGS=$LOGS is not empty and holds no logs of this suite:" \
        "give a new or empty directory"
fi

if [ "$(id -u)" = 0 ]; then
    # As root, the safety net below kills every process of TEST_USER: two
    # runs at once would kill each other's.  One at a time.
    LOCK=/run/lock/$TEST_USER.lock
    exec 9>>"$LOCK"
    if ! flock -n 9; then
        log "another run of the libvirt suite as $TEST_USER holds $LOCK" \
            "(two at once would kill each other's processes): waiting for it"
        flock 9
    fi
fi

# PKG/RELEASE: that release's version; install-deps.sh never downgrades, so
# LIBVIRT_RELEASE=bookworm after 11.3 stops and names what to remove first
pkgs=()
for p in $LIBVIRT_PKGS; do pkgs+=("$p/$LIBVIRT_RELEASE"); done
"$TOP/scripts/install-deps.sh" "${pkgs[@]}" 9>&-   # nothing keeps the lock

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

# The test user reads the suite and QEMU's QMP library, and runs the build
# (libvirt starts QEMU as that user): not so from a clone under /root
for f in "$TOP/tests/libvirt/suite.py" "$TOP/tests/pylib/qemu_procs.py" \
        "$TREE/python/qemu/qmp/legacy.py"; do
    as_user test -r "$f" ||
        die "$TEST_USER cannot read $f (missing, or a directory above it is" \
            "closed to others): put the project where $TEST_USER can read it"
done
for f in qemu-system-x86_64 qemu-img qemu-io storage-daemon/qemu-storage-daemon; do
    as_user test -x "$BUILD_DIR/$f" ||
        die "$TEST_USER cannot run $BUILD_DIR/$f (missing, or a directory above" \
            "it is closed to others): put the build where $TEST_USER can run it"
done

WORK=$(mktemp -d /tmp/qlv.XXXXXX)    # short: UNIX socket paths below
chown "$TEST_USER" "$WORK"
cleanup() {
    # The suite stops what it started and checks after each case that
    # nothing is left; this is the safety net for a suite that was itself
    # killed.  libvirtd, the NBD targets and virsh die with the suite
    # (PR_SET_PDEATHSIG), libvirt's QEMUs do not: they name $WORK in their
    # command lines.  As root, the test user has nothing else to lose (and
    # the lock keeps other runs out).  SIGCONT first, for a target the
    # suite froze.
    local which=(-f -- "$WORK/") name
    [ "$TEST_USER" = "$(id -un)" ] || which=()
    pkill -CONT -u "$TEST_USER" "${which[@]}" || true
    pkill -KILL -u "$TEST_USER" "${which[@]}" || true
    # Replace the logs of the cases that ran, nothing else
    if [ -d "$WORK/logs" ] && mkdir -p "$LOGS" && touch "$LOGS/$LOGS_MARK"; then
        for name in "$WORK/logs"/*/; do
            name=$(basename "$name")
            rm -rf "${LOGS:?}/$name"
            cp -r "$WORK/logs/$name" "$LOGS/$name" || true
        done
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP    # so that cleanup runs then too

log "libvirt suite ($(libvirtd --version)) as $TEST_USER; logs in $LOGS"
as_user "$PYTHON" "$TOP/tests/libvirt/suite.py" "$WORK" "$BUILD_DIR" \
    "$TREE/python" "$@" 9>&-
