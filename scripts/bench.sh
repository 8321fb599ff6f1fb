#!/usr/bin/env bash
# Build an unpatched (stock) and a patched QEMU at -O2 from the same source
# tree, run bench/bench.py on both in one run, and write bench/results/:
# results.md (the table), results.json, divergence.png; the table also goes
# into README.md between the bench markers.
. "$(dirname "$0")/lib.sh"

"$TOP/scripts/install-deps.sh" python3-matplotlib
"$TOP/scripts/prepare-tree.sh"
"$TOP/scripts/build-qemu.sh" stock 2      # cached after the first run
"$TOP/scripts/build-qemu.sh" patched 2
log "running the benchmarks (about 7 minutes)"
"$PYTHON" "$TOP/bench/bench.py" all "$TOP/bench/results" "$TOP/README.md" \
    "$(build_dir stock 2)" "$(build_dir patched 2)" "$TREE/python"
log "results: bench/results/results.md, divergence.png"
