#!/usr/bin/env bash
# Benchmark of live migration with cowsnapd between two nodes on this
# machine (two network namespaces joined by a veth pair, each with its own
# containerd and cowsnapd, mutual TLS between them: the harness of
# integration/tests/daemon.rs), on the reference tree of DESIGN.md
# "Targets": a parent with 1 GiB of anonymous memory and 8 children each
# dirtying 10% of the pages, beside a shell counter, in a container that
# Migrate moves from node A to node B.
#
# Each of REPS runs (default 1) is the ignored test bench_migrate_reference_tree,
# built in release, on nodes of its own. Prints, per run and as medians:
# bytes sent, the checkpoint's size, time frozen (the checkpoint: the dump
# and containerd storing it), downtime (checkpoint start to running on B),
# Migrate's total time, the container's PSS on A before and on B after,
# and the downtime's phases as the stages reach the client (checkpoint on
# A, transfer, import and restore on B). It never asserts a figure (the
# test checks only that the tree runs on B and verifies its memory there).
#
# Usage (as root): bench/migrate.sh [--reps N] [--mode MODE] [--mib N] [--children K]
#                  [--dirty-pct P] [--keep]
#   --keep leaves the work directory (the test's output) in place.
# Environment: CARGO_TARGET_DIR (default <repo>/target), BENCH_DIR (default
# /var/tmp, where the test's output is kept). The nodes' containerds live in
# the test's temporary directories; a run needs about 6 GiB of free memory
# for the default tree (the tree on A, then on B; the checkpoint in both
# content stores' page cache).
set -euo pipefail

reps=1
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --reps) reps=$2; shift 2 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) args+=("$1"); shift ;;
    esac
done
bench=bench/migrate.sh help_lines='2,25p' why_root="the nodes are network namespaces with containerds; cowsnap dump reads PFNs"
# shellcheck source=bench/common.sh
. "$(dirname "$0")/common.sh"
bench_setup "${args[@]+"${args[@]}"}"
if [ "$extra_vmas" != 0 ]; then
    echo "$bench: --extra-vmas is not supported here" >&2
    exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
cleanup() {
    if [ "$keep" = 1 ]; then
        echo "kept:                   $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# The value after the word $1 in the figures line on stdin.
field() { awk -v k="$1" '{ for (i = 1; i < NF; i++) if ($i == k) print $(i + 1) }'; }

echo "reference tree: mode $mode, $mib MiB, $children children, $dirty% dirty, + a shell counter; $reps run(s)"
for run in $(seq "$reps"); do
    log="$work/run-$run.log"
    if ! (cd "$repo" && COWSNAP_BENCH_MODE=$mode COWSNAP_BENCH_MIB=$mib \
        COWSNAP_BENCH_CHILDREN=$children COWSNAP_BENCH_DIRTY_PCT=$dirty \
        cargo test --quiet --release -p cowsnap-integration --test daemon -- \
        --ignored --exact bench_migrate_reference_tree --nocapture --test-threads=1) \
        >"$log" 2>&1 </dev/null; then
        echo "$bench: run $run failed:" >&2
        tail -n 60 "$log" >&2
        exit 1
    fi
    line=$(grep '^migrate-bench:' "$log" | tail -n 1)
    [ -n "$line" ] || { echo "$bench: run $run printed no figures:" >&2; tail -n 30 "$log" >&2; exit 1; }
    sent=$(field bytes_sent <<<"$line") size=$(field checkpoint_size <<<"$line")
    frozen=$(field frozen_ms <<<"$line") down=$(field downtime_ms <<<"$line")
    total=$(field total_ms <<<"$line") resumed=$(field resumed <<<"$line")
    pss_a=$(field pss_a <<<"$line") pss_b=$(field pss_b <<<"$line")
    # The phases, from when each stage reached the client.
    at_ckpt=$(field checkpointed_at_ms <<<"$line") at_sent=$(field transferred_at_ms <<<"$line")
    at_run=$(field running_at_ms <<<"$line")
    transfer=$((at_sent - at_ckpt)) restore=$((at_run - at_sent))
    printf 'run %d: sent %s MiB (%s B; checkpoint %s B, resumed %s)  frozen %s ms  downtime %s ms  total %s ms  PSS %s MiB on A, %s MiB on B (x%s)\n' \
        "$run" "$(mib_of "$sent")" "$sent" "$size" "$resumed" "$frozen" "$down" "$total" \
        "$(mib_of "$pss_a")" "$(mib_of "$pss_b")" \
        "$(awk -v a="$pss_b" -v b="$pss_a" 'BEGIN { printf "%.4f", a / b }')"
    printf '       phases: checkpoint on A %s ms, transfer %s ms, import and restore on B %s ms\n' \
        "$at_ckpt" "$transfer" "$restore"
    echo "$sent $frozen $down $total $pss_a $pss_b $transfer $restore" >>"$work/figures"
done

f() { awk -v c="$1" '{ print $c }' "$work/figures" | median; }
printf 'median of %d: sent %s MiB  frozen %s ms  downtime %s ms  total %s ms  PSS %s MiB on A, %s MiB on B\n' \
    "$reps" "$(mib_of "$(f 1)")" "$(f 2)" "$(f 3)" "$(f 4)" "$(mib_of "$(f 5)")" "$(mib_of "$(f 6)")"
printf '       phases: transfer %s ms, import and restore on B %s ms\n' "$(f 7)" "$(f 8)"
