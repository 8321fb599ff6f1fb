#!/usr/bin/env bash
# Write the commits of build/qemu back to patches/:
#   pristine..downstream -> patches/downstream   (build fixes, never upstream)
#   downstream..HEAD     -> patches/series       (the upstream-bound series)
# The file numbering is the order `git am` applies them in. Headers are
# stable (zero commit id, no version signature) so unchanged patches do not churn.
. "$(dirname "$0")/lib.sh"

[ -d "$TREE/.git" ] || die "no $TREE: run make first"
[ -z "$(git -C "$TREE" status --porcelain --untracked-files=no)" ] ||
    die "$TREE has uncommitted changes: commit them first"

export_group() {   # export_group DIR RANGE
    local dir=$PATCHES/$1
    mkdir -p "$dir"
    find "$dir" -name '*.patch' -delete
    git -C "$TREE" format-patch -q --zero-commit --no-signature --full-index \
        --no-numbered --subject-prefix=PATCH -o "$dir" "$2"
    log "patches/$1: $(find "$dir" -name '*.patch' | wc -l) patches"
}

export_group downstream "$TAG_PRISTINE..$TAG_DOWNSTREAM"
export_group series "$TAG_DOWNSTREAM..HEAD"

# Record what the tree now matches, so prepare-tree.sh sees nothing new.
record_applied
