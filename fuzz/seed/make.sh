#!/usr/bin/env bash
# Rebuilds fuzz/seed/image (as root): compiles tree.c, starts it, dumps it
# with the cowsnap binary given (default: the debug build) and --exit.
# The image is the base every fuzz target mutates one file of, and the
# source of the seed corpus (fuzz/corpus/, made by `cargo run --bin
# make-corpus` in fuzz/).
set -euo pipefail
cd "$(dirname "$0")"
cowsnap=${1:-${CARGO_TARGET_DIR:-../../target}/debug/cowsnap}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gcc -O1 -o "$work/tree" tree.c
setsid "$work/tree" "$work/ready" </dev/null >/dev/null 2>&1 &
root=$!
for _ in $(seq 100); do [ -s "$work/ready" ] && break; sleep 0.1; done
rm -rf image
"$cowsnap" dump --exit --quiet --pid "$root" --images "$work/img"
# The SysV segment outlives the tree.
ipcrm -m "$(cat "$work/ready")"
mv "$work/img" image
ls -l image
