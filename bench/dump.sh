#!/usr/bin/env bash
# Benchmark of `cowsnap dump` on the reference tree of DESIGN.md "Targets":
# a parent with 1 GiB of anonymous memory (half of each page random, half
# zero) and 8 children each dirtying 10% of the pages.
#
# Prints figures (it never asserts): the tree's unique memory (PSS), image
# size and its ratio to PSS, dump wall time, time the tree was frozen (from
# the dump's summary line), and MiB/s of unique memory. Kills the tree at the end.
#
# Usage (as root): bench/dump.sh [--mode MODE] [--mib N] [--children K] [--dirty-pct P] [--keep]
#   MODE is any --mode of cowsnap-refworkload (plain, split-vma, moved-vma, ...).
#   --keep leaves the image and the work directory in place.
# Environment: CARGO_TARGET_DIR (default <repo>/target), BENCH_DIR (default
# /var/tmp, where the image is written), COWSNAP_BIN / REFWORKLOAD_BIN to
# use prebuilt binaries instead of building release ones.
set -euo pipefail

bench=bench/dump.sh help_lines='2,17p' why_root="cowsnap dump reads PFNs and seizes the tree"
# shellcheck source=bench/common.sh
. "$(dirname "$0")/common.sh"
bench_setup "$@"
root=""
cleanup() {
    if [ -n "$root" ] && kill -0 "$root" 2>/dev/null; then
        kill -TERM "$root" 2>/dev/null || true
        wait "$root" 2>/dev/null || true
    fi
    if [ "$keep" = 1 ]; then
        echo "kept:                   $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

start_tree

pids=$(tree_pids "$root")
nprocs=$(echo "$pids" | wc -w)
nthreads=0
for pid in $pids; do nthreads=$((nthreads + $(ls "/proc/$pid/task" | wc -l))); done
pss_unique=$(pss_bytes "Pss_Anon,Pss_Shmem" $pids)
pss_all=$(pss_bytes "Pss" $pids)

start=$(date +%s.%N)
status=0
"$COWSNAP_BIN" dump --pid "$root" --images "$work/img" 2>"$work/dump.err" >"$work/dump.out" || status=$?
end=$(date +%s.%N)
if [ "$status" != 0 ]; then
    echo "bench/dump.sh: cowsnap dump failed (exit $status):" >&2
    cat "$work/dump.err" >&2
    exit 1
fi
wall=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')

image_bytes=$(find "$work/img" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
unique_pages=$("$COWSNAP_BIN" inspect "$work/img" --json 2>/dev/null \
    | grep -o '"unique_pages_stored": *[0-9]*' | grep -o '[0-9]*$' || true)
# The summary line of the dump: "... 1.741 s total, 1.702 s frozen".
frozen=$(cat "$work/dump.out" "$work/dump.err" | grep -oE '[0-9]+(\.[0-9]+)? s frozen' | tail -n 1 \
    | grep -oE '^[0-9]+(\.[0-9]+)? s' || true)

# Does the tree still hold what it should? (reported, not asserted)
lines_before=$(wc -l <"$work/report")
for pid in $pids; do kill -USR1 "$pid" 2>/dev/null || true; done
for _ in $(seq 600); do
    answered=$(tail -n +"$((lines_before + 1))" "$work/report" | grep -cE '^(OK|BAD) ' || true)
    [ "$answered" -ge "$nprocs" ] && break
    sleep 0.1
done
ok=$(tail -n +"$((lines_before + 1))" "$work/report" | grep -c '^OK ' || true)

echo
printf '%-24s %s\n' "tree:" "$nprocs processes, $nthreads threads (mode $mode)"
printf '%-24s %s\n' "unique memory (PSS):" "$(mib_of "$pss_unique") MiB (Pss_Anon + Pss_Shmem; all PSS $(mib_of "$pss_all") MiB)"
printf '%-24s %s MiB\n' "image bytes:" "$(mib_of "$image_bytes")"
printf '%-24s %s\n' "image / unique:" "$(awk -v i="$image_bytes" -v p="$pss_unique" 'BEGIN { printf "%.3f", p ? i / p : 0 }')"
if [ -n "$unique_pages" ]; then
    stored=$((unique_pages * $(getconf PAGESIZE)))
    printf '%-24s %s\n' "unique pages stored:" "$(mib_of "$stored") MiB ($unique_pages pages, $(awk -v s="$stored" -v p="$pss_unique" 'BEGIN { printf "%.3f", p ? s / p : 0 }') x PSS, uncompressed)"
else
    printf '%-24s %s\n' "unique pages stored:" "n/a (cowsnap inspect --json gave no totals.unique_pages_stored)"
fi
printf '%-24s %s s\n' "dump wall time:" "$wall"
[ -n "$frozen" ] || frozen="n/a (no frozen figure in the output of the dump)"
printf '%-24s %s\n' "time frozen:" "$frozen"
printf '%-24s %s MiB/s\n' "dump throughput:" "$(awk -v p="$pss_unique" -v w="$wall" 'BEGIN { printf "%.0f", (w > 0 ? p / 1048576 / w : 0) }')"
printf '%-24s %s\n' "tree after dump:" "$ok of $nprocs processes verified their memory OK"
