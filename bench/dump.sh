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

mode=plain mib=1024 children=8 dirty=10 keep=0
while [ $# -gt 0 ]; do
    case "$1" in
        --mode) mode=$2; shift 2 ;;
        --mib) mib=$2; shift 2 ;;
        --children) children=$2; shift 2 ;;
        --dirty-pct) dirty=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "bench/dump.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" != 0 ]; then
    echo "bench/dump.sh: run as root (cowsnap dump reads PFNs and seizes the tree)" >&2
    exit 2
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${COWSNAP_BIN:-}" ] || [ -z "${REFWORKLOAD_BIN:-}" ]; then
    (cd "$repo" && cargo build --quiet --release -p cowsnap --bin cowsnap \
        -p cowsnap-integration --bin cowsnap-refworkload)
    release="${CARGO_TARGET_DIR:-$repo/target}/release"
    COWSNAP_BIN=${COWSNAP_BIN:-$release/cowsnap}
    REFWORKLOAD_BIN=${REFWORKLOAD_BIN:-$release/cowsnap-refworkload}
fi

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/cowsnap-bench.XXXXXX")
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

# Pids of the tree, root first.
tree_pids() {
    local queue=("$1") pid tid
    while [ ${#queue[@]} -gt 0 ]; do
        pid=${queue[0]}
        queue=("${queue[@]:1}")
        [ -d "/proc/$pid" ] || continue
        echo "$pid"
        for tid in /proc/"$pid"/task/*; do
            # shellcheck disable=SC2207
            queue+=($(cat "$tid/children" 2>/dev/null || true))
        done
    done
}

# Sum of the given smaps_rollup fields over the tree, in bytes.
pss_bytes() {
    local fields=$1 pid total=0 kb
    for pid in $pids; do
        kb=$(awk -v f="$fields" 'BEGIN { n = split(f, want, ",") }
            { for (i = 1; i <= n; i++) if ($1 == want[i] ":") s += $2 } END { print s + 0 }' \
            "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
        total=$((total + kb * 1024))
    done
    echo "$total"
}

mib_of() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

echo "starting reference tree: mode $mode, $mib MiB, $children children, $dirty% dirty"
"$REFWORKLOAD_BIN" --mode "$mode" --mib "$mib" --children "$children" --dirty-pct "$dirty" \
    --report "$work/report" --ready "$work/ready" </dev/null >/dev/null 2>"$work/tree.err" &
root=$!
for _ in $(seq 6000); do
    [ -f "$work/ready" ] && break
    if ! kill -0 "$root" 2>/dev/null; then
        echo "bench/dump.sh: reference tree died during setup:" >&2
        cat "$work/tree.err" >&2
        exit 1
    fi
    sleep 0.05
done
[ -f "$work/ready" ] || { echo "bench/dump.sh: tree not ready after 5 minutes" >&2; exit 1; }

pids=$(tree_pids "$root")
nprocs=$(echo "$pids" | wc -w)
nthreads=0
for pid in $pids; do nthreads=$((nthreads + $(ls "/proc/$pid/task" | wc -l))); done
pss_unique=$(pss_bytes "Pss_Anon,Pss_Shmem")
pss_all=$(pss_bytes "Pss")

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
