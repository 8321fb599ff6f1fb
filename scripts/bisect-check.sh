#!/usr/bin/env bash
# Build and run the quick tests (the lines of tests/suite.list marked "quick")
# after each patch of the series in turn, in the worktree build/qemu-bisect, so
# that build/qemu is left alone. Stops at the first patch that fails.
. "$(dirname "$0")/lib.sh"

[ -d "$TREE/.git" ] || die "no $TREE: run make first"
wt=$(worktree bisect)
[ -d "$wt" ] || git -C "$TREE" worktree add -q --detach "$wt" "$TAG_DOWNSTREAM"

for commit in $(git -C "$TREE" rev-list --reverse "$TAG_DOWNSTREAM..HEAD"); do
    log "after: $(git -C "$TREE" log -1 --format='%h %s' "$commit")"
    git -C "$wt" checkout -q --detach "$commit"
    "$TOP/scripts/build-qemu.sh" bisect 0
    "$TOP/scripts/run-tests.sh" --quick "$(build_dir bisect 0)" ||
        die "quick tests fail after $(git -C "$TREE" log -1 --format='%h %s' "$commit")"
done
log "every patch builds and passes the quick tests"
