#!/usr/bin/env bash
# Runs every Go fuzz target in the module for the given time each
# (go test -fuzz accepts one target per run).
set -euo pipefail
fuzztime=${1:-30s}
cd "$(dirname "$0")/.."
found=0
for pkg in $(go list ./...); do
	for target in $(go test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true); do
		found=$((found + 1))
		echo "== fuzz $pkg $target for $fuzztime"
		go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" -fuzzminimizetime 5s "$pkg"
	done
done
echo "fuzz: $found targets ran for $fuzztime each"
[ "$found" -gt 0 ]
