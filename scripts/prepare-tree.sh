#!/usr/bin/env bash
# Create build/qemu: the pristine tarball as the first commit (tag 'pristine'),
# then patches/downstream (build fixes, tag 'downstream'), then patches/series,
# each patch a commit applied with `git am`.
# Re-applies when patches/ changed, unless the tree holds work of its own.
. "$(dirname "$0")/lib.sh"

tarball=$("$TOP/scripts/fetch-qemu.sh")

# Committer identity for the tree's own commits; authors come from the patches.
export GIT_COMMITTER_NAME="qemu-block-series" GIT_COMMITTER_EMAIL="series@localhost"
export GIT_AUTHOR_NAME="$GIT_COMMITTER_NAME" GIT_AUTHOR_EMAIL="$GIT_COMMITTER_EMAIL"

apply_group() {   # apply_group downstream|series
    local files
    files=$(patch_files "$1")
    [ -n "$files" ] || return 0
    log "applying patches/$1 ($(echo "$files" | wc -l) patches)"
    # shellcheck disable=SC2086
    git -C "$TREE" am -q --keep-cr $files || {
        git -C "$TREE" am --abort || true
        die "patches/$1 does not apply (see above)"
    }
}

apply_all() {
    git -C "$TREE" checkout -q -B main "$TAG_PRISTINE"
    apply_group downstream
    git -C "$TREE" tag -f "$TAG_DOWNSTREAM" >/dev/null
    apply_group series
    record_applied
}

unpack() {
    local name tmp
    log "unpacking $(basename "$tarball") into $TREE"
    tmp=$(mktemp -d "$BUILD/unpack.XXXXXX")
    tar --no-same-owner -xJf "$tarball" -C "$tmp"
    name=$(ls "$tmp")
    mv "$tmp/$name" "$TREE"
    rmdir "$tmp"
    git -C "$TREE" init -q -b main
    git -C "$TREE" add -A -f
    git -C "$TREE" commit -q -m "QEMU $name: pristine upstream source" \
        -m "From Debian's $(basename "$tarball"), unmodified."
    git -C "$TREE" tag "$TAG_PRISTINE"
}

if [ ! -d "$TREE/.git" ]; then
    rm -rf "$TREE"
    unpack
    apply_all
    exit 0
fi

read -r stamp head < "$APPLIED" 2>/dev/null || { stamp=; head=; }
[ "$stamp" = "$(series_stamp)" ] && exit 0

# patches/ changed (e.g. after a pull). Rebuild the branch only if the tree has
# no commits or edits that patches/ does not have.
if [ "$head" = "$(git -C "$TREE" rev-parse HEAD)" ] &&
   [ -z "$(git -C "$TREE" status --porcelain --untracked-files=no)" ]; then
    log "patches/ changed: re-applying the series"
    apply_all
else
    die "patches/ differs from what $TREE was built from, and $TREE has work of its own.
Export it first (make export), or drop it (make reset-tree)."
fi
