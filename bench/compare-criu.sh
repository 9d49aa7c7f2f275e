#!/usr/bin/env bash
# cowsnap against CRIU 4.2, side by side in one run, on the reference tree of
# DESIGN.md "Targets" (cowsnap-refworkload: a parent with 1 GiB of anonymous
# memory, 8 children each dirtying 10% of the pages; --mode picks the pattern).
#
# Builds CRIU 4.2 from ../shared/anchors/criu-4.2.tar.gz (apt build deps of
# the README beside it) into CRIU_DIR, off PATH, unless already built there.
# Each of REPS repetitions (default 5) times the population limit (a python3
# helper that maps the tree's unique memory, Pss_Anon + Pss_Shmem, with 4 KiB
# pages and faults it in with MADV_POPULATE_WRITE: one thread, no data to
# read) and then, for each tool in turn (the order alternates from one
# repetition to the next), starts a fresh tree (setsid: its own session),
# measures its PSS, dumps it with the tree killed at the end
#   cowsnap dump --exit -q --pid ROOT --images DIR
#   criu dump -t ROOT -D DIR
# and waits until its pids are free, then restores it, timed until the
# command returns with the tree running,
#   cowsnap restore -q --images DIR
#   criu restore -d -D DIR
# has every restored process verify its memory (SIGUSR1, OK/BAD lines),
# measures PSS again and kills the restored tree. Prints every run, then the
# medians, the ratios cowsnap/CRIU (dump, restore, image size), restore /
# population limit and how many restored processes verified OK. It reports;
# it never asserts (exit 1 only if a dump or a restore failed).
#
# Usage (as root): bench/compare-criu.sh [--reps N] [--mode MODE] [--mib N]
#                  [--children K] [--dirty-pct P] [--keep]
#   MODE is a --mode of cowsnap-refworkload both tools handle (plain, moved-vma, ...).
#   --keep leaves the images and the work directory in place.
# Environment: CRIU_DIR (default /var/tmp/cowsnap-criu-4.2), CRIU_TARBALL,
# CARGO_TARGET_DIR (default <repo>/target), BENCH_DIR (default /var/tmp,
# where images are written), COWSNAP_BIN / REFWORKLOAD_BIN to use prebuilt
# binaries instead of building release ones, CRIU_DUMP_FLAGS /
# CRIU_RESTORE_FLAGS for extra criu options (none are needed for this tree).
set -euo pipefail

reps=5
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --reps) reps=$2; shift 2 ;;
        -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
        *) args+=("$1"); shift ;;
    esac
done
case "$reps" in
    '' | *[!0-9]* | 0) echo "bench/compare-criu.sh: --reps needs a positive integer" >&2; exit 2 ;;
esac
bench=bench/compare-criu.sh help_lines='2,34p' why_root="both tools seize the tree and choose pids"
repo=$(cd "$(dirname "$0")/.." && pwd)

# ------------------------------------------------------------ CRIU 4.2
CRIU_DIR=${CRIU_DIR:-/var/tmp/cowsnap-criu-4.2}
CRIU_TARBALL=${CRIU_TARBALL:-$repo/../shared/anchors/criu-4.2.tar.gz}
criu_bin=$CRIU_DIR/criu-4.2/criu/criu
criu_deps=(build-essential pkg-config libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler
    protobuf-compiler python3-protobuf libnl-3-dev libnet1-dev libcap-dev libaio-dev libbsd-dev
    libgnutls28-dev libnftables-dev libdrm-dev uuid-dev)

criu_fail() {
    echo "bench/compare-criu.sh: cannot build CRIU 4.2 in $CRIU_DIR: $*" >&2
    exit 1
}

criu_build() {
    if [ -x "$criu_bin" ] && "$criu_bin" --version 2>/dev/null | grep -q 'Version: 4\.2$'; then
        return 0
    fi
    [ -f "$CRIU_TARBALL" ] || criu_fail "no tarball at $CRIU_TARBALL (set CRIU_TARBALL)"
    local missing=() pkg
    for pkg in "${criu_deps[@]}"; do
        dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing CRIU build dependencies: ${missing[*]}"
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$CRIU_DIR.apt.log" 2>&1; then
            apt-get update -q >>"$CRIU_DIR.apt.log" 2>&1 || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >>"$CRIU_DIR.apt.log" 2>&1 \
                || { tail -n 20 "$CRIU_DIR.apt.log" >&2; criu_fail "apt-get install failed (log: $CRIU_DIR.apt.log)"; }
        fi
    fi
    echo "building CRIU 4.2 in $CRIU_DIR (log: $CRIU_DIR/build.log)"
    rm -rf "$CRIU_DIR/criu-4.2"
    mkdir -p "$CRIU_DIR"
    tar -xzf "$CRIU_TARBALL" -C "$CRIU_DIR" || criu_fail "cannot unpack $CRIU_TARBALL"
    [ -d "$CRIU_DIR/criu-4.2" ] || criu_fail "$CRIU_TARBALL has no criu-4.2/ directory"
    if ! (cd "$CRIU_DIR/criu-4.2" && make -j2 PYTHON=/usr/bin/python3 criu) >"$CRIU_DIR/build.log" 2>&1; then
        tail -n 25 "$CRIU_DIR/build.log" >&2
        criu_fail "make failed (log: $CRIU_DIR/build.log)"
    fi
    "$criu_bin" --version 2>/dev/null | grep -q 'Version: 4\.2$' \
        || criu_fail "$criu_bin does not run or is not version 4.2"
}

if [ "$(id -u)" != 0 ]; then
    echo "$bench: run as root ($why_root)" >&2
    exit 2
fi
criu_build
case ":$PATH:" in
    *":$(dirname "$criu_bin"):"*) echo "$bench: note: $(dirname "$criu_bin") is on PATH" >&2 ;;
esac

# shellcheck source=bench/common.sh
. "$(dirname "$0")/common.sh"
bench_setup "${args[@]+"${args[@]}"}"

# ------------------------------------------------------------ helpers
live=""   # pids of trees that may still run (original or restored)
roots=""  # their roots, for a SIGTERM first
cleanup() {
    local pid file
    # A restore that returned after the signal came: its tree is not listed yet.
    for file in "$work"/*/restored.pid; do
        [ -f "$file" ] || continue
        pid=$(cat "$file" 2>/dev/null || true)
        [ -n "$pid" ] || continue
        roots="$roots $pid"
        live="$live $(tree_pids "$pid" 2>/dev/null | tr '\n' ' ' || true)"
    done
    for pid in $roots; do kill -TERM "$pid" 2>/dev/null || true; done
    [ -z "$roots" ] || sleep 0.3
    for pid in $roots $live; do kill -KILL "$pid" 2>/dev/null || true; done
    if [ "$keep" = 1 ]; then
        echo "kept: $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# Waits until none of the given pids exists (zombies included).
wait_free() {
    local pid left
    for _ in $(seq 6000); do
        left=0
        for pid in "$@"; do [ -d "/proc/$pid" ] && { left=1; break; }; done
        [ "$left" = 0 ] && return 0
        sleep 0.01
    done
    echo "$bench: pids still taken after 60 s: $*" >&2
    return 1
}

# Sends SIGUSR1 to the given pids and prints how many answered OK in REPORT
# (as "ok bad"), after up to 60 s for every one to answer.
verify() {
    local report=$1 before answered pid
    shift
    before=$(wc -l <"$report")
    for pid in "$@"; do kill -USR1 "$pid" 2>/dev/null || true; done
    for _ in $(seq 600); do
        answered=$(tail -n +"$((before + 1))" "$report" | grep -cE '^(OK|BAD) ' || true)
        [ "$answered" -ge "$#" ] && break
        sleep 0.1
    done
    echo "$(tail -n +"$((before + 1))" "$report" | grep -c '^OK ' || true)" \
        "$(tail -n +"$((before + 1))" "$report" | grep -c '^BAD ' || true)"
}

# The population limit: seconds to map BYTES of anonymous memory (4 KiB
# pages, as the tree's) and have the kernel allocate and zero every page.
populate_secs() {
    python3 - "$1" <<'EOF'
import mmap, sys, time
page = mmap.PAGESIZE
n = (int(sys.argv[1]) + page - 1) // page * page
t0 = time.perf_counter()
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(getattr(mmap, "MADV_NOHUGEPAGE", 15))
try:
    m.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23))
except OSError:  # kernel before 5.14: one byte per page
    for i in range(0, n, page):
        m[i] = 1
t1 = time.perf_counter()
print(f"{t1 - t0:.3f}")
EOF
}

# One run: TOOL (cowsnap or criu) on a fresh tree, in directory $work/$2.
# Sets r_dump r_restore r_image r_pss_before r_pss_after r_unique r_ok r_n,
# and r_fail (empty, or what failed).
run_tool() {
    local tool=$1 dir=$work/$2 job root pids rroot restored status t0 t1 pid okbad
    r_dump="" r_restore="" r_image="" r_pss_before="" r_pss_after="" r_unique="" r_ok=0 r_n=0 r_fail=""
    mkdir -p "$dir"
    setsid -w "$REFWORKLOAD_BIN" --mode "$mode" --mib "$mib" --children "$children" --dirty-pct "$dirty" \
        --report "$dir/report" --ready "$dir/ready" </dev/null >/dev/null 2>"$dir/tree.err" &
    job=$! root=$!
    roots="$roots $root"
    for _ in $(seq 6000); do
        [ -f "$dir/ready" ] && break
        if ! kill -0 "$root" 2>/dev/null; then
            r_fail="tree died during setup: $(head -c 300 "$dir/tree.err")"
            wait "$job" 2>/dev/null || true
            roots=""
            return 0
        fi
        sleep 0.05
    done
    [ -f "$dir/ready" ] || { r_fail="tree not ready after 5 minutes"; return 0; }  # cleanup kills it
    # The root wrote its pid (the same as $job unless setsid had to fork: then it waits for it).
    root=$(cat "$dir/ready")
    roots="$roots $root"
    # shellcheck disable=SC2207
    pids=($(tree_pids "$root"))
    live="$live ${pids[*]}"
    r_pss_before=$(pss_bytes "Pss" "${pids[@]}")
    r_unique=$(pss_bytes "Pss_Anon,Pss_Shmem" "${pids[@]}")

    # bash reports the SIGKILL of its background job (the root) on its own
    # stderr when it reaps it: silence that until the root is reaped.
    exec 3>&2 2>/dev/null
    status=0
    t0=$(now)
    case "$tool" in
        cowsnap) timeout 900 "$COWSNAP_BIN" dump --exit -q --pid "$root" --images "$dir/img" \
            >"$dir/dump.out" 2>"$dir/dump.err" || status=$? ;;
        # shellcheck disable=SC2086 # the extra flags are split into words
        criu) mkdir -p "$dir/img"
            timeout 900 "$criu_bin" dump -t "$root" -D "$dir/img" -o "$dir/dump.log" -v2 $criu_dump_flags \
                >"$dir/dump.out" 2>"$dir/dump.err" || status=$? ;;
    esac
    t1=$(now)
    if [ "$status" != 0 ]; then
        kill -TERM "$root" 2>/dev/null || true
        wait "$job" 2>/dev/null || true
        exec 2>&3 3>&-
        r_fail="$tool dump failed (exit $status): $(last_lines "$dir/dump.err" "$dir/dump.log")"
        for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
        wait_free "${pids[@]}" && roots="" live=""
        return 0
    fi
    r_dump=$(secs "$t0" "$t1")
    kill -KILL "$root" 2>/dev/null || true  # (both tools left it dead already)
    wait "$job" 2>/dev/null || true
    exec 2>&3 3>&-
    wait_free "${pids[@]}" || { r_fail="the dumped tree's pids are still taken"; return 0; }
    roots="" live=""
    r_image=$(du -sb "$dir/img" | awk '{ print $1 }')

    status=0
    t0=$(now)
    case "$tool" in
        cowsnap) timeout 900 "$COWSNAP_BIN" restore -q --images "$dir/img" --pidfile "$dir/restored.pid" \
            >"$dir/restore.out" 2>"$dir/restore.err" || status=$? ;;
        # shellcheck disable=SC2086
        criu) timeout 900 "$criu_bin" restore -d -D "$dir/img" -o "$dir/restore.log" -v2 \
            --pidfile "$dir/restored.pid" $criu_restore_flags \
            >"$dir/restore.out" 2>"$dir/restore.err" || status=$? ;;
    esac
    t1=$(now)
    rroot=$(cat "$dir/restored.pid" 2>/dev/null || true)
    if [ -n "$rroot" ]; then
        roots="$roots $rroot"
        # shellcheck disable=SC2207
        restored=($(tree_pids "$rroot"))
        live="$live ${restored[*]}"
    fi
    if [ "$status" != 0 ] || [ -z "$rroot" ]; then
        r_fail="$tool restore failed (exit $status): $(last_lines "$dir/restore.err" "$dir/restore.log")"
        [ -z "$rroot" ] || { kill_tree "$rroot" "${restored[@]}" && forget "$dir"; }
        return 0
    fi
    r_restore=$(secs "$t0" "$t1")
    r_pss_after=$(pss_bytes "Pss" "${restored[@]}")
    r_n=${#restored[@]}
    okbad=$(verify "$dir/report" "${restored[@]}")
    r_ok=${okbad% *}
    [ "$r_n" = "${#pids[@]}" ] || r_fail="restored $r_n processes of ${#pids[@]}"
    if kill_tree "$rroot" "${restored[@]}"; then
        forget "$dir"
    else
        r_fail="the restored tree's pids are still taken"
    fi
    [ "$keep" = 1 ] || rm -rf "$dir/img"
}

# SIGTERM to the root (it kills and reaps its descendants), then SIGKILL to
# what is left; waits until every pid is free (the root is not our child:
# whoever it was reparented to reaps it).
kill_tree() {
    local rroot=$1 pid
    kill -TERM "$rroot" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$rroot" 2>/dev/null || break
        sleep 0.05
    done
    for pid in "$@"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait_free "$@"
}

# The last non-empty lines of the given files (those that exist), on one line.
last_lines() {
    cat "$@" 2>/dev/null | grep -v '^$' | tail -n 4 | tr '\n' ' ' || true
}

# The tree of run directory DIR is gone: nothing of it for cleanup to kill
# (its pids may be reused).
forget() {
    roots="" live=""
    rm -f "$1/restored.pid"
}

median() {
    sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print ""; exit }
        printf "%.3f\n", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "n/a"; else printf "%.3f", a / b }'; }
mib_or_na() { if [ -n "$1" ]; then mib_of "$1"; else echo "n/a"; fi; }

# ------------------------------------------------------------ the runs
# The tree runs in its own session (setsid), stdin/stdout /dev/null and
# stderr and the report on regular files: CRIU needs no --shell-job.
criu_dump_flags=${CRIU_DUMP_FLAGS:-}
criu_restore_flags=${CRIU_RESTORE_FLAGS:-}
ncores=$(nproc)
echo "$bench: $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -r), $ncores cores, $reps repetitions"
echo "cowsnap: $COWSNAP_BIN"
echo "criu:    $criu_bin ($("$criu_bin" --version | head -n 1))"
echo "tree:    cowsnap-refworkload --mode $mode --mib $mib --children $children --dirty-pct $dirty"
echo

declare -A vals
failures=0
for rep in $(seq "$reps"); do
    if [ $((rep % 2)) = 1 ]; then order="cowsnap criu"; else order="criu cowsnap"; fi
    for tool in $order; do
        run_tool "$tool" "r$rep-$tool"
        line=$(printf 'run %d %-7s dump %6s s  restore %6s s  image %7s MiB  PSS %7s -> %7s MiB  verified %d/%d OK' \
            "$rep" "$tool" "${r_dump:-n/a}" "${r_restore:-n/a}" "$(mib_or_na "$r_image")" \
            "$(mib_or_na "$r_pss_before")" "$(mib_or_na "$r_pss_after")" "$r_ok" "$r_n")
        echo "$line"
        if [ -n "$r_fail" ]; then
            echo "    FAILED: $r_fail"
            failures=$((failures + 1))
        fi
        [ -z "$r_dump" ] || vals[$tool.dump]+="$r_dump "
        [ -z "$r_restore" ] || vals[$tool.restore]+="$r_restore "
        [ -z "$r_image" ] || vals[$tool.image]+="$r_image "
        [ -z "$r_pss_before" ] || vals[$tool.pss_before]+="$r_pss_before "
        [ -z "$r_pss_after" ] || vals[$tool.pss_after]+="$r_pss_after "
        [ -z "$r_unique" ] || unique_last=$r_unique
        vals[$tool.ok]=$(( ${vals[$tool.ok]:-0} + r_ok ))
        vals[$tool.n]=$(( ${vals[$tool.n]:-0} + r_n ))
        vals[$tool.runs]=$(( ${vals[$tool.runs]:-0} + 1 ))
        # Population limit, once per repetition, with no tree alive: the
        # unique memory of the tree just measured.
        if [ "$tool" = "${order%% *}" ] && [ -n "${unique_last:-}" ]; then
            p=$(populate_secs "$unique_last")
            printf 'run %d %-7s %s MiB (the unique memory, Pss_Anon + Pss_Shmem) in %s s\n' \
                "$rep" "populate" "$(mib_of "$unique_last")" "$p"
            vals[populate]+="$p "
            vals[unique]+="$unique_last "
        fi
    done
done

med() { echo "${vals[$1]:-}" | tr ' ' '\n' | { grep -v '^$' || true; } | median; }
declare -A m
for key in cowsnap.dump cowsnap.restore cowsnap.image cowsnap.pss_before cowsnap.pss_after \
    criu.dump criu.restore criu.image criu.pss_before criu.pss_after populate unique; do
    m[$key]=$(med "$key")
done

echo
echo "medians over $reps repetitions (mode $mode, $mib MiB, $children children, $dirty% dirty; $ncores cores):"
printf '  %-26s %10s %10s %14s\n' "" cowsnap CRIU "cowsnap/CRIU"
printf '  %-26s %10s %10s %14s\n' "dump (s)" "${m[cowsnap.dump]:-n/a}" "${m[criu.dump]:-n/a}" \
    "$(ratio "${m[cowsnap.dump]}" "${m[criu.dump]}")"
printf '  %-26s %10s %10s %14s\n' "restore (s)" "${m[cowsnap.restore]:-n/a}" "${m[criu.restore]:-n/a}" \
    "$(ratio "${m[cowsnap.restore]}" "${m[criu.restore]}")"
printf '  %-26s %10s %10s %14s\n' "image (MiB)" "$(mib_or_na "${m[cowsnap.image]}")" \
    "$(mib_or_na "${m[criu.image]}")" "$(ratio "${m[cowsnap.image]}" "${m[criu.image]}")"
printf '  %-26s %10s %10s\n' "PSS before dump (MiB)" "$(mib_or_na "${m[cowsnap.pss_before]}")" \
    "$(mib_or_na "${m[criu.pss_before]}")"
printf '  %-26s %10s %10s\n' "PSS after restore (MiB)" "$(mib_or_na "${m[cowsnap.pss_after]}")" \
    "$(mib_or_na "${m[criu.pss_after]}")"
printf '  %-26s %10s %10s\n' "PSS after / before" "$(ratio "${m[cowsnap.pss_after]}" "${m[cowsnap.pss_before]}")" \
    "$(ratio "${m[criu.pss_after]}" "${m[criu.pss_before]}")"
printf '  %-26s %10s %10s\n' "restore / population limit" \
    "$(ratio "${m[cowsnap.restore]}" "${m[populate]}")" "$(ratio "${m[criu.restore]}" "${m[populate]}")"
printf '  %-26s %10s %10s\n' "verified OK after restore" "${vals[cowsnap.ok]:-0}/${vals[cowsnap.n]:-0}" \
    "${vals[criu.ok]:-0}/${vals[criu.n]:-0}"
printf '  population limit: %s s for %s MiB (MADV_POPULATE_WRITE, one thread, 4 KiB pages)\n' \
    "${m[populate]:-n/a}" "$(mib_or_na "${m[unique]}")"
all_ok=no
if [ "${vals[cowsnap.ok]:-0}" = "${vals[cowsnap.n]:-0}" ] && [ "${vals[criu.ok]:-0}" = "${vals[criu.n]:-0}" ] \
    && [ "${vals[cowsnap.n]:-0}" -gt 0 ] && [ "${vals[criu.n]:-0}" -gt 0 ] && [ "$failures" = 0 ]; then
    all_ok=yes
fi
echo "  every restored process verified OK: $all_ok"
[ "$failures" = 0 ] || { echo "  $failures run(s) failed (see FAILED above)"; exit 1; }
