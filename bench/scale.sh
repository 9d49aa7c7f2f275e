#!/usr/bin/env bash
# The scale cases of cowsnap dump and restore (bench/restore.sh, one run
# each, figures printed, nothing asserted):
#   500 processes   a root and 499 children, 16 MiB each dirtying 10%
#   8 GiB parent    a root with 8 GiB of memory and one child dirtying 10%
#   20,000 VMAs     a root with 20,000 one-page mappings and one child
# For each: dump and restore wall time, the peak RSS of the `cowsnap`
# command itself for the dump and for the restore (GNU time's %M), PSS
# before and after, VMA counts and how many restored processes verified
# their memory. The 8 GiB case needs about 20 GiB of free memory (the tree,
# then the restored tree, and the image in BENCH_DIR's page cache).
#
# Usage (as root): bench/scale.sh [CASE...]   CASE: procs, big, vmas (default: all)
# Environment: as bench/restore.sh (COWSNAP_BIN, REFWORKLOAD_BIN, BENCH_DIR).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(procs big vmas)
for c in "${cases[@]}"; do
    case "$c" in
        procs) args=(--mib 16 --children 499 --dirty-pct 10) ;;
        big) args=(--mib 8192 --children 1 --dirty-pct 10) ;;
        vmas) args=(--mib 16 --children 1 --dirty-pct 10 --extra-vmas 20000) ;;
        -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "bench/scale.sh: unknown case $c (procs, big, vmas)" >&2; exit 2 ;;
    esac
    echo "=== $c: ${args[*]}"
    bash "$here/restore.sh" "${args[@]}"
    echo
done
