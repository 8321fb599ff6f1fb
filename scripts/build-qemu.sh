#!/usr/bin/env bash
# Configure and build QEMU out of tree.
#   build-qemu.sh [patched|stock] [0|2]
# patched: build/qemu (pristine + downstream + series)       -> build/patched-O<level>
# stock:   worktree build/qemu-stock at tag 'downstream'       -> build/stock-O<level>
# bisect:  worktree build/qemu-bisect, at whatever commit bisect-check.sh chose
# Level 0 (default) is for tests, 2 (with debug info) for benchmarks.
# Builds only what the tests use: the five binaries and the job unit tests.
. "$(dirname "$0")/lib.sh"

variant=${1:-patched}
level=${2:-0}
out=$(build_dir "$variant" "$level")

case $variant in
patched) src=$TREE ;;
stock)
    src=$(worktree stock)
    [ -d "$src" ] || git -C "$TREE" worktree add -q --detach "$src" "$TAG_DOWNSTREAM"
    git -C "$src" checkout -q --detach "$TAG_DOWNSTREAM"
    ;;
bisect) src=$(worktree bisect) ;;   # checked out by bisect-check.sh
*) die "unknown variant '$variant' (patched, stock or bisect)" ;;
esac
[ -d "$src" ] || die "no source tree $src"
case $level in
0) opt="-Doptimization=0 -Ddebug=false" ;;
2) opt="-Doptimization=2 -Ddebug=true" ;;
*) die "unknown optimisation level '$level' (0 or 2)" ;;
esac

BINARIES="qemu-system-x86_64 qemu-img qemu-io qemu-nbd storage-daemon/qemu-storage-daemon"
UNIT_TESTS="tests/unit/test-blockjob tests/unit/test-blockjob-txn tests/unit/test-bdrv-drain
            tests/unit/test-block-iothread"

if [ ! -f "$out/build.ninja" ]; then
    log "configuring $variant QEMU (-O$level) in $out"
    mkdir -p "$out"
    # The devices file is configs/devices/x86_64-softmmu/block-tests.mak
    # (patches/downstream). ccache must be named here: QEMU's cross file
    # hides the compiler from the environment.
    # shellcheck disable=SC2086
    (cd "$out" && "$src/configure" --python="$PYTHON" --cc="ccache cc" \
        --target-list=x86_64-softmmu --with-devices-x86_64=block-tests \
        --without-default-features --without-default-devices \
        --enable-tools --enable-linux-aio --enable-linux-io-uring --enable-gnutls \
        --disable-docs --disable-download --disable-install-blobs \
        $opt) > "$out/configure.log" 2>&1 ||
        { tail -n 30 "$out/configure.log"; die "configure failed (log: $out/configure.log)"; }
fi

log "building $variant QEMU (-O$level)"
# shellcheck disable=SC2086
ninja -C "$out" $BINARIES $UNIT_TESTS > "$out/ninja.log" 2>&1 ||
    { grep -E -A5 'error|FAILED' "$out/ninja.log" | head -n 60; die "build failed (log: $out/ninja.log)"; }

# Firmware for the PC machine: binaries run from the build tree look in
# qemu-bundle/<datadir>; the +ds tarball ships none, Debian's packages do.
datadir=$(cd "$out" && find qemu-bundle -type d -path '*/share/qemu' | head -n 1)
[ -n "$datadir" ] || datadir=qemu-bundle/usr/local/share/qemu
mkdir -p "$out/$datadir"
for fw in /usr/share/seabios/bios-256k.bin /usr/share/qemu/kvmvapic.bin \
          /usr/share/seabios/vgabios-stdvga.bin; do
    [ -e "$fw" ] || die "firmware $fw missing: run scripts/install-deps.sh"
    ln -sf "$fw" "$out/$datadir/"
done
log "built: $out"
