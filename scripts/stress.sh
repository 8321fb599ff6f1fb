#!/usr/bin/env bash
# Stateful stress test of mirror jobs (tests/stress/): random schedules of
# faults and QMP commands against one build, every failure shrunk and
# replayed on the stock build.  Results: build/stress/report.md, and one
# reproduction (JSON) per signature of violation under build/stress/run-*/.
#   STRESS_BUILD=DIR  build under test (default build/patched-O0)
#   STOCK_BUILD=DIR   the unpatched build to compare with (default build/stock-O0)
#   STRESS_TIME=S     time budget of the search in seconds (default 600)
#   STRESS_EXAMPLES=N stop after N schedules instead
#   SEED=N            first Hypothesis seed (default 0)
#   STRESS_SHRINK=S   time to shrink the failures of each round (default 300)
#   STRESS_HARD_LIMIT=S  kill the whole run (and its QEMUs) after S seconds
#   REPLAY=FILE       replay one recorded schedule instead of searching
#                     (then on stock too if it fails: regression or not)
#   STRESS_CI=1       the slice of `make check` instead (TAP, fixed seed)
. "$(dirname "$0")/lib.sh"

build=${STRESS_BUILD:-$(build_dir patched 0)}
stock=${STOCK_BUILD:-$(build_dir stock 0)}
[ -x "$build/qemu-system-x86_64" ] || die "no QEMU build in $build: run make first"
[ -x "$stock/qemu-system-x86_64" ] ||
    log "no stock build in $stock (make stock): failures will not be classified"
"$PYTHON" -c 'import hypothesis' 2>/dev/null ||
    die "python3-hypothesis is missing: run scripts/install-deps.sh"

args=(--build "$build" --stock "$stock" --python "$TREE/python" --out "$BUILD/stress"
      --seed "${SEED:-0}")
[ -z "${STRESS_HARD_LIMIT:-}" ] || args+=(--hard-limit "$STRESS_HARD_LIMIT")
if [ -n "${REPLAY:-}" ]; then
    exec "$PYTHON" "$TOP/tests/stress/stress.py" replay "$REPLAY" "${args[@]}"
fi
if [ -n "${STRESS_CI:-}" ]; then
    exec "$PYTHON" "$TOP/tests/stress/stress.py" ci "${args[@]}"
fi
[ -z "${STRESS_TIME:-}" ] || args+=(--time "$STRESS_TIME")
[ -z "${STRESS_EXAMPLES:-}" ] || args+=(--examples "$STRESS_EXAMPLES")
[ -z "${STRESS_SHRINK:-}" ] || args+=(--shrink "$STRESS_SHRINK")
exec "$PYTHON" "$TOP/tests/stress/stress.py" run "${args[@]}"
