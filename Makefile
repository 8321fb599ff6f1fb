# QEMU block-layer patch series: fetch, patch, build, test.
# Every step is a script in scripts/; this file only names them.
S := scripts

.PHONY: all build deps tree check check-quick check-libvirt export bisect stock bench stress reset-tree clean distclean

all: build

# Install build/test dependencies (Debian packages), fetch Debian 13's QEMU
# source, apply patches/, and build the patched binaries (-O0) in build/patched-O0.
build: tree
	$(S)/build-qemu.sh patched 0

deps:
	$(S)/install-deps.sh

tree: deps
	$(S)/prepare-tree.sh

# Run tests/suite.list against build/patched-O0; ends with "N passed, N failed".
# The stress slice replays what it finds on the stock build to tell a
# regression from what QEMU already did, so check builds stock too.
check: build stock
	$(S)/run-tests.sh

check-quick: build
	$(S)/run-tests.sh --quick

# Debian's libvirt drives the patched build (tests/libvirt/suite.py).
check-libvirt: build
	$(S)/check-libvirt.sh

# Write the commits of build/qemu back to patches/.
export:
	$(S)/export-series.sh

# Build and run the quick tests after each patch of the series in turn.
bisect: tree
	$(S)/bisect-check.sh

# The unpatched build (pristine + downstream build fixes) in build/stock-O0.
stock: tree
	$(S)/build-qemu.sh stock 0

# Stock vs patched benchmarks (-O2 builds) into bench/results/.
bench: tree
	$(S)/bench.sh

# Stateful stress test of mirror jobs (tests/stress/), build/patched-O0 vs
# build/stock-O0; STRESS_BUILD, STOCK_BUILD, STRESS_TIME, STRESS_EXAMPLES,
# SEED, REPLAY=file: see scripts/stress.sh.
stress:
	$(S)/stress.sh

# Throw away build/qemu (and its worktrees) and the builds; keep the download.
reset-tree:
	rm -rf build/qemu build/qemu-* build/patched-* build/stock-* build/bisect-*

clean: reset-tree

distclean:
	rm -rf build
