#!/usr/bin/env bash
# Benchmark of `cowsnap restore` on the reference tree of DESIGN.md "Targets":
# a parent with 1 GiB of anonymous memory (half of each page random, half
# zero) and 8 children each dirtying 10% of the pages.
#
# Starts the tree, measures its PSS (total and anonymous) and the VMA count
# of every process, dumps it with --exit, waits until its pids are free,
# then times `cowsnap restore` into the same pid namespace. Prints figures
# (it never asserts): restore wall time, MiB/s of unique memory (the image's
# totals.bytes_unique_uncompressed), PSS and VMA counts before/after, and how
# many restored processes verified their memory OK. Kills the tree at the end.
#
# Usage (as root): bench/restore.sh [--mode MODE] [--mib N] [--children K] [--dirty-pct P]
#                  [--extra-vmas V] [--keep]
#   MODE is any --mode of cowsnap-refworkload that restore supports (plain,
#   split-vma, moved-vma, parent-dirty, sibling, reparented, deep-chain, threads).
#   --keep leaves the image and the work directory in place.
# Environment: CARGO_TARGET_DIR (default <repo>/target), BENCH_DIR (default
# /var/tmp, where the image is written), COWSNAP_BIN / REFWORKLOAD_BIN to
# use prebuilt binaries instead of building release ones.
set -euo pipefail

bench=bench/restore.sh help_lines='2,20p' why_root="cowsnap dump reads PFNs; restore chooses pids"
# shellcheck source=bench/common.sh
. "$(dirname "$0")/common.sh"
bench_setup "$@"
root="" rroot="" rpids=""
cleanup() {
    if [ -n "$root" ] && kill -0 "$root" 2>/dev/null; then
        kill -TERM "$root" 2>/dev/null || true
        wait "$root" 2>/dev/null || true
    fi
    kill_restored
    if [ "$keep" = 1 ]; then
        echo "kept:                     $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

vma_count() { wc -l <"/proc/$1/maps" 2>/dev/null || echo "?"; }

# The restored tree is not our child (its parent, the restore command, has
# exited): SIGTERM to its root kills the rest; SIGKILL whatever is left.
kill_restored() {
    [ -n "$rroot" ] || return 0
    local all pid
    all="$rpids $(tree_pids "$rroot" 2>/dev/null || true)"
    kill -TERM "$rroot" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$rroot" 2>/dev/null || break
        sleep 0.05
    done
    for pid in $all; do kill -KILL "$pid" 2>/dev/null || true; done
    rroot=""
}

start_tree

# shellcheck disable=SC2207
pids=($(tree_pids "$root"))
nprocs=${#pids[@]}
declare -A vmas_before
for pid in "${pids[@]}"; do vmas_before[$pid]=$(vma_count "$pid"); done
pss_before=$(pss_bytes "Pss" "${pids[@]}")
anon_before=$(pss_bytes "Pss_Anon" "${pids[@]}")

# bash reports the SIGKILL of its background job (the root) on its own
# stderr whenever it notices; silence that until the root is reaped.
exec 3>&2 2>/dev/null
start=$(date +%s.%N)
status=0
/usr/bin/time -f %M -o "$work/dump.rss" \
    "$COWSNAP_BIN" dump -q --exit --pid "$root" --images "$work/img" >"$work/dump.out" 2>"$work/dump.err" || status=$?
end=$(date +%s.%N)
if [ "$status" != 0 ]; then
    exec 2>&3 3>&-
    echo "bench/restore.sh: cowsnap dump failed (exit $status):" >&2
    cat "$work/dump.err" >&2
    exit 1
fi
dump_wall=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')

# The root is our child: reap it; init reaps the others.
wait "$root" || true
exec 2>&3 3>&-
root=""
for _ in $(seq 6000); do
    left=0
    for pid in "${pids[@]}"; do [ -d "/proc/$pid" ] && left=1; done
    [ "$left" = 0 ] && break
    sleep 0.01
done
if [ "$left" != 0 ]; then
    echo "bench/restore.sh: the dumped tree's pids are still taken after 60 s" >&2
    exit 1
fi

json=$("$COWSNAP_BIN" inspect "$work/img" --json 2>/dev/null || true)
unique_bytes=$(echo "$json" | grep -o '"bytes_unique_uncompressed": *[0-9]*' | grep -o '[0-9]*$' || true)
zero_pages=$(echo "$json" | grep -o '"pages_zero": *[0-9]*' | tail -n 1 | grep -o '[0-9]*$' || true)

start=$(date +%s.%N)
status=0
/usr/bin/time -f %M -o "$work/restore.rss" \
    "$COWSNAP_BIN" restore -q --images "$work/img" --pidfile "$work/restored.pid" \
    >"$work/restore.out" 2>"$work/restore.err" || status=$?
end=$(date +%s.%N)
if [ "$status" != 0 ]; then
    echo "bench/restore.sh: cowsnap restore failed (exit $status):" >&2
    cat "$work/restore.err" >&2
    exit 1
fi
wall=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')
rroot=$(cat "$work/restored.pid")
# shellcheck disable=SC2207
restored=($(tree_pids "$rroot"))
rpids=${restored[*]}
pss_after=$(pss_bytes "Pss" "${restored[@]}")
anon_after=$(pss_bytes "Pss_Anon" "${restored[@]}")
declare -A vmas_after
for pid in "${restored[@]}"; do vmas_after[$pid]=$(vma_count "$pid"); done

# Does every restored process hold what it should? (reported, not asserted)
lines_before=$(wc -l <"$work/report")
for pid in "${restored[@]}"; do kill -USR1 "$pid" 2>/dev/null || true; done
for _ in $(seq 600); do
    answered=$(tail -n +"$((lines_before + 1))" "$work/report" | grep -cE '^(OK|BAD) ' || true)
    [ "$answered" -ge "${#restored[@]}" ] && break
    sleep 0.1
done
ok=$(tail -n +"$((lines_before + 1))" "$work/report" | grep -c '^OK ' || true)
bad=$(tail -n +"$((lines_before + 1))" "$work/report" | grep '^BAD ' | head -n 3 || true)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", b ? a / b : 0 }'; }

echo
printf '%-26s %s\n' "tree:" "$nprocs processes (mode $mode), restored ${#restored[@]}, root $rroot"
printf '%-26s %s s\n' "dump wall time (--exit):" "$dump_wall"
printf '%-26s %s s\n' "restore wall time:" "$wall"
# Peak RSS of the commands themselves (GNU time's %M, KiB): the dumper, and
# the restore command with the restore processes it waited for.
printf '%-26s %s MiB dump, %s MiB restore\n' "peak RSS of cowsnap:" \
    "$(mib_of "$(( $(tail -n 1 "$work/dump.rss") * 1024 ))")" \
    "$(mib_of "$(( $(tail -n 1 "$work/restore.rss") * 1024 ))")"
if [ -n "$unique_bytes" ]; then
    printf '%-26s %s MiB\n' "unique memory (image):" "$(mib_of "$unique_bytes")"
    printf '%-26s %s MiB/s\n' "restore throughput:" \
        "$(awk -v u="$unique_bytes" -v w="$wall" 'BEGIN { printf "%.0f", (w > 0 ? u / 1048576 / w : 0) }')"
else
    printf '%-26s %s\n' "restore throughput:" "n/a (inspect --json gave no totals.bytes_unique_uncompressed)"
fi
printf '%-26s %s\n' "restore summary:" "$(tail -n 1 "$work/restore.out")"
printf '%-26s %s MiB before, %s MiB after (x %s)\n' "PSS:" \
    "$(mib_of "$pss_before")" "$(mib_of "$pss_after")" "$(ratio "$pss_after" "$pss_before")"
printf '%-26s %s MiB before, %s MiB after (x %s; %s zero pages not reallocated)\n' "Pss_Anon:" \
    "$(mib_of "$anon_before")" "$(mib_of "$anon_after")" "$(ratio "$anon_after" "$anon_before")" "${zero_pages:-?}"
if [ "$nprocs" -le 16 ]; then
    printf '%-26s\n' "VMAs per process:"
    for pid in "${pids[@]}"; do
        printf '  %-8s %6s before %6s after\n' "$pid" "${vmas_before[$pid]}" "${vmas_after[$pid]:-gone}"
    done
    for pid in "${restored[@]}"; do
        [ -n "${vmas_before[$pid]:-}" ] || printf '  %-8s %6s before %6s after (new pid)\n' "$pid" "-" "${vmas_after[$pid]}"
    done
else
    same=0
    for pid in "${pids[@]}"; do
        [ "${vmas_before[$pid]}" = "${vmas_after[$pid]:-gone}" ] && same=$((same + 1))
    done
    printf '%-26s %s of %s processes have as many VMAs as before (root: %s before, %s after)\n' \
        "VMAs:" "$same" "$nprocs" "${vmas_before[${pids[0]}]}" "${vmas_after[${pids[0]}]:-gone}"
fi
printf '%-26s %s\n' "verified after restore:" "$ok of ${#restored[@]} processes OK"
[ -z "$bad" ] || printf '%-26s %s\n' "first BAD answers:" "$bad"
kill_restored
