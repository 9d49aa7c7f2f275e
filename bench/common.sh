# Shared by bench/dump.sh and bench/restore.sh, which source it after
# setting `bench` (their name), `help_lines` (the sed range of their header
# comment) and `why_root` (why they need root).

# Options, root check, binaries, work directory. Sets mode mib children
# dirty keep extra_vmas, COWSNAP_BIN REFWORKLOAD_BIN and work.
bench_setup() {
    mode=plain mib=1024 children=8 dirty=10 keep=0 extra_vmas=0
    while [ $# -gt 0 ]; do
        case "$1" in
            --mode) mode=$2; shift 2 ;;
            --mib) mib=$2; shift 2 ;;
            --children) children=$2; shift 2 ;;
            --dirty-pct) dirty=$2; shift 2 ;;
            --extra-vmas) extra_vmas=$2; shift 2 ;;
            --keep) keep=1; shift ;;
            -h|--help) sed -n "$help_lines" "$0"; exit 0 ;;
            *) echo "$bench: unknown argument $1" >&2; exit 2 ;;
        esac
    done
    if [ "$(id -u)" != 0 ]; then
        echo "$bench: run as root ($why_root)" >&2
        exit 2
    fi
    local repo release
    repo=$(cd "$(dirname "$0")/.." && pwd)
    if [ -z "${COWSNAP_BIN:-}" ] || [ -z "${REFWORKLOAD_BIN:-}" ]; then
        (cd "$repo" && cargo build --quiet --release -p cowsnap --bin cowsnap \
            -p cowsnap-integration --bin cowsnap-refworkload)
        release="${CARGO_TARGET_DIR:-$repo/target}/release"
        COWSNAP_BIN=${COWSNAP_BIN:-$release/cowsnap}
        REFWORKLOAD_BIN=${REFWORKLOAD_BIN:-$release/cowsnap-refworkload}
    fi
    work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/cowsnap-bench.XXXXXX")
}

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

# Sum of the given smaps_rollup fields over the given pids, in bytes.
pss_bytes() {
    local fields=$1 pid total=0 kb
    shift
    for pid in "$@"; do
        kb=$(awk -v f="$fields" 'BEGIN { n = split(f, want, ",") }
            { for (i = 1; i <= n; i++) if ($1 == want[i] ":") s += $2 } END { print s + 0 }' \
            "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
        total=$((total + kb * 1024))
    done
    echo "$total"
}

mib_of() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

# Starts the reference tree in the background (sets `root`) and waits
# until it is set up.
start_tree() {
    echo "starting reference tree: mode $mode, $mib MiB, $children children, $dirty% dirty, $extra_vmas extra VMAs"
    "$REFWORKLOAD_BIN" --mode "$mode" --mib "$mib" --children "$children" --dirty-pct "$dirty" \
        --extra-vmas "$extra_vmas" \
        --report "$work/report" --ready "$work/ready" </dev/null >/dev/null 2>"$work/tree.err" &
    root=$!
    for _ in $(seq 6000); do
        [ -f "$work/ready" ] && return 0
        if ! kill -0 "$root" 2>/dev/null; then
            echo "$bench: reference tree died during setup:" >&2
            cat "$work/tree.err" >&2
            exit 1
        fi
        sleep 0.05
    done
    echo "$bench: tree not ready after 5 minutes" >&2
    exit 1
}
