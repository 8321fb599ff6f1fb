# Shared paths and helpers for the project's scripts; sourced, never run.
# shellcheck shell=bash

set -euo pipefail

TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD="$TOP/build"                 # everything generated lives here (git-ignored)
CACHE="$BUILD/cache"               # downloaded Debian source package
TREE="$BUILD/qemu"                 # QEMU git work tree: pristine + downstream + series
BASE_FILE="$TOP/qemu-base.conf"    # which upstream release we build on
PATCHES="$TOP/patches"

# Tags in $TREE that delimit the patch groups.
TAG_PRISTINE=pristine              # the unpacked orig tarball
TAG_DOWNSTREAM=downstream          # + patches/downstream (build fixes, never upstream)

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The base record is shell-sourceable KEY=value lines.
load_base() {
    [ -f "$BASE_FILE" ] || die "$BASE_FILE is missing"
    # shellcheck source=/dev/null
    . "$BASE_FILE"
}

# Extra git worktrees of $TREE (stock, bisect) live beside it.
worktree() {
    printf '%s/qemu-%s\n' "$BUILD" "$1"
}

# Build directory for a variant: patched|stock and an optimisation level.
build_dir() {
    printf '%s/%s-O%s\n' "$BUILD" "$1" "$2"
}

# Python without pyenv shims: QEMU's configure builds a venv from it and
# needs the system's python3-tomli / python3-venv.
PYTHON=/usr/bin/python3

# The patch files of one group (downstream|series), in the order they apply.
patch_files() {
    if [ -d "$PATCHES/$1" ]; then find "$PATCHES/$1" -name '*.patch' | sort; fi
}

# $TREE/.git/applied-series records "HASH-OF-patches/ HEAD" after the tree was
# built from patches/ or exported to it; prepare-tree.sh compares against it.
APPLIED="$TREE/.git/applied-series"
series_stamp() {
    { patch_files downstream; patch_files series; } | xargs -r cat | sha256sum | cut -d' ' -f1
}
record_applied() {
    echo "$(series_stamp) $(git -C "$TREE" rev-parse HEAD)" > "$APPLIED"
}
