#!/usr/bin/env bash
# Run the test suite listed in tests/suite.list against one build and end
# with the line "N passed, N failed, N skipped". Exit status 1 on any failure.
#   run-tests.sh [--quick] [BUILD_DIR]     (default: build/patched-O0)
# --quick runs only the lines marked "quick" (used by `make bisect`).
. "$(dirname "$0")/lib.sh"

quick=0
if [ "${1:-}" = --quick ]; then quick=1; shift; fi
out=${1:-$(build_dir patched 0)}
[ -x "$out/qemu-system-x86_64" ] || die "no QEMU build in $out: run make first"
LOGS=$out/test-logs
mkdir -p "$LOGS"
rm -f "$LOGS"/iotests-*.log "$LOGS"/iotests-*.log.rerun
: > "$LOGS/results.tap"

COUNTS=$LOGS/counts       # one "pass fail skip" line per suite
: > "$COUNTS"

excluded_reason() {   # excluded_reason SUITE TEST
    awk -v s="$1" -v t="$2" '$1 == s && $2 == t {$1 = $2 = ""; sub(/^ +/, ""); print; exit}' \
        "$TOP/tests/excluded.list"
}

# Count one suite's TAP output (stdin), print its summary line.
tally() {   # tally NAME
    local counts pass fail skip
    counts=$(tee -a "$LOGS/results.tap" | awk '
        /^ok .*# SKIP/ {s++; next}
        /^ok /         {p++; next}
        /^not ok /     {f++; print > "/dev/stderr"}
        END            {printf "%d %d %d\n", p, f, s}')
    read -r pass fail skip <<< "$counts"
    printf '%-28s %d passed, %d failed, %d skipped\n' "$1:" "$pass" "$fail" "$skip"
    echo "$counts" >> "$COUNTS"
}

run_iotests() {   # run_iotests OPTION TEST...
    local opt=$1 t tests=() reason log src missing=()
    shift
    # The source tree of this build: tests added by a later patch are not
    # there when `make bisect` tests an earlier one.
    src=$(dirname "$(readlink -f "$out/tests/qemu-iotests/check")")
    for t in "$@"; do
        reason=$(excluded_reason "$opt" "$t")
        if [ -n "$reason" ]; then
            printf '  excluded %s %s: %s\n' "$opt" "$t" "$reason"
        elif [ ! -f "$src/$t" ] && [ ! -f "$src/tests/$t" ]; then
            missing+=("$t")
        else
            tests+=("$t")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        if [ $quick = 1 ]; then
            printf '  not in this tree yet: %s\n' "${missing[*]}"
        else
            printf 'not ok - %s is missing from the tree\n' "${missing[@]}" |
                tally "iotests $opt (missing)"
        fi
    fi
    [ ${#tests[@]} -gt 0 ] || return 0
    # Several lines of the suite may run the same format: one log each
    log=$LOGS/iotests$opt.log
    local n=1
    while [ -e "$log" ]; do
        n=$((n + 1))
        log=$LOGS/iotests$opt-$n.log
    done
    # One test at a time: several timing-sensitive tests (e.g. 185) race
    # when two run side by side on a 2-core machine.
    (cd "$out/tests/qemu-iotests" && "$PYTHON" ./check -tap "$opt" "${tests[@]}") \
        > "$log" 2>&1 || true
    # Show the diffs of failed tests: they follow "not ok" in the TAP stream.
    awk '/^not ok/ {show = 1} /^(ok|# running)/ {show = 0} show' "$log" | head -n 200
    # Some stock tests race on a loaded machine (e.g. 185 did: an event that
    # comes before the command's reply). Run a failed test once more; it
    # counts as passed only if it passes then, and is named as flaky.
    local failed
    failed=$(awk '/^not ok/ {print $NF}' "$log")
    if [ -n "$failed" ]; then
        # shellcheck disable=SC2086
        (cd "$out/tests/qemu-iotests" && "$PYTHON" ./check -tap "$opt" $failed) \
            > "$log.rerun" 2>&1 || true
        sed -n 's/^ok \(.*\)/  FLAKY (failed, then passed on a re-run): \1/p' "$log.rerun"
        { grep -E '^ok ' "$log"; grep -E '^(not )?ok ' "$log.rerun"; } |
            tally "iotests $opt"
    else
        grep -E '^(not )?ok ' "$log" | tally "iotests $opt"
    fi
}

run_unit() {   # run_unit TEST...
    local t
    for t in "$@"; do
        "$out/tests/unit/$t" --tap > "$LOGS/$t.log" 2>&1 ||
            echo "not ok - $t exited with status $?" >> "$LOGS/$t.log"
        grep -E '^(not )?ok ' "$LOGS/$t.log" | tally "unit $t"
    done
}

# checkpatch.pl errors left after removing those in tests/checkpatch-allow.list
checkpatch_errors() {   # checkpatch_errors PATCH LOG
    local slug
    slug=$(basename "$1" .patch); slug=${slug#[0-9][0-9][0-9][0-9]-}
    sed -n 's/^ERROR: //p' "$2" | while IFS= read -r err; do
        awk -F'\t' -v s="$slug" -v e="$err" \
            '!/^#/ && index(s, $1) == 1 && $2 == e {found = 1} END {exit !found}' \
            "$TOP/tests/checkpatch-allow.list" || echo "$err"
    done
}

run_lint() {
    local p log=$LOGS/checkpatch.log
    for p in "$PATCHES"/downstream/*.patch "$PATCHES"/series/*.patch; do
        [ -f "$p" ] || continue
        (cd "$TREE" && ./scripts/checkpatch.pl -q "$p") > "$log" 2>&1 || true
        if [ -z "$(checkpatch_errors "$p" "$log")" ]; then
            echo "ok - checkpatch $(basename "$p")"
        else
            cat "$log" >&2
            echo "not ok - checkpatch $(basename "$p")"
        fi
    done | tally "checkpatch"
}

# The stress slice (tests/stress/stress.py ci): the corpus of reproductions
# replayed, then a fixed-seed slice of random schedules; its failures are
# replayed on the stock build (if there is one) to tell ours from QEMU's.
run_stress() {
    "$PYTHON" "$TOP/tests/stress/stress.py" ci --build "$out" \
        --stock "$(build_dir stock 0)" --python "$TREE/python" \
        --out "$LOGS/stress" > "$LOGS/stress.log" 2>&1 ||
        echo "not ok - stress slice exited with status $?" >> "$LOGS/stress.log"
    grep -E '^(not )?ok ' "$LOGS/stress.log" | tally "stress"
}

while read -r first rest; do
    case $first in ''|'#'*) continue ;; esac
    if [ "$first" = quick ]; then
        read -r first rest <<< "$rest"
    elif [ $quick = 1 ]; then
        continue
    fi
    # shellcheck disable=SC2086
    case $first in
    iotests) run_iotests $rest ;;
    unit) run_unit $rest ;;
    lint) run_lint ;;
    stress) run_stress ;;
    *) die "tests/suite.list: unknown suite '$first'" ;;
    esac
done < "$TOP/tests/suite.list"

read -r pass fail skip < <(awk '{p += $1; f += $2; s += $3} END {print p+0, f+0, s+0}' "$COUNTS")
echo "$pass passed, $fail failed, $skip skipped"
[ "$fail" = 0 ]
