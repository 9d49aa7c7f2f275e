#!/usr/bin/env bash
# Benchmark of dump --exit + restore of real servers on the host: nginx
# (Debian's, a master and 4 workers serving a file), the preforking
# Python HTTP server of integration/workloads (its master loads MIB MiB,
# default 256, before forking 8 workers that accept on one socket), Redis
# with 1M keys and PostgreSQL 15 with shared_buffers=256MB and 1M rows.
#
# For each server and each of REPS repetitions (default 3): PSS of the tree,
# `cowsnap dump --exit` wall time, `cowsnap restore` wall time, PSS after,
# and a request answered after the restore. Prints every run and the median
# of each figure (it never asserts). Kills the servers at the end.
#
# Usage (as root): bench/servers.sh [--reps N] [--mib MIB]
# Environment: CARGO_TARGET_DIR (default <repo>/target), BENCH_DIR (default
# /var/tmp, where images are written), COWSNAP_BIN to use a prebuilt binary.
set -euo pipefail

reps=3 model_mib=256
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --reps) reps=$2; shift 2 ;;
        --mib) model_mib=$2; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) args+=("$1"); shift ;;
    esac
done
bench=bench/servers.sh help_lines='2,16p' why_root="cowsnap dump reads PFNs and seizes processes"
# shellcheck source=bench/common.sh
. "$(dirname "$0")/common.sh"
bench_setup "${args[@]+"${args[@]}"}"
repo=$(cd "$(dirname "$0")/.." && pwd)
live=""
cleanup() {
    for pid in $live; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
get() { python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode().strip())' "$1"; }

# Waits until a GET of $1 answers.
wait_up() {
    for _ in $(seq 400); do
        get "$1" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "$bench: $1 never answered" >&2
    exit 1
}

# measure NAME ROOT URL|-- CMD...: one dump --exit + restore of the tree at
# ROOT, then the answer of a GET of URL (or of CMD).
measure() {
    local name=$1 root=$2 url=$3 img pids before after t dump_s restore_s answer
    shift 3
    img="$work/img-$name-$RANDOM"
    # shellcheck disable=SC2207
    pids=($(tree_pids "$root"))
    before=$(pss_bytes Pss "${pids[@]}")
    t=$(now)
    "$COWSNAP_BIN" dump -q --exit --pid "$root" --images "$img" >"$work/dump.out"
    dump_s=$(since "$t")
    for _ in $(seq 200); do kill -0 "$root" 2>/dev/null || break; sleep 0.01; done
    t=$(now)
    "$COWSNAP_BIN" restore -q --images "$img" >"$work/restore.out" 2>&1 </dev/null
    restore_s=$(since "$t")
    live="${pids[*]}"
    after=$(pss_bytes Pss "${pids[@]}")
    if [ "$url" = "--" ]; then
        answer=$("$@" 2>&1 | tr '\n' ' ' | head -c 60)
    else
        answer=$(get "$url" | head -c 60)
    fi
    printf '%-8s %4d procs  image %7s MiB  dump %6s s  restore %6s s  PSS %7s -> %7s MiB (x%s)  answer: %s\n' \
        "$name" "${#pids[@]}" "$(mib_of "$(du -sb "$img" | cut -f1)")" "$dump_s" "$restore_s" \
        "$(mib_of "$before")" "$(mib_of "$after")" \
        "$(awk -v a="$after" -v b="$before" 'BEGIN { printf "%.4f", a / b }')" "$answer"
    echo "$name $dump_s $restore_s $before $after" >>"$work/figures"
    rm -rf "$img"
}

# --- nginx
port=$(free_port)
ngx="$work/nginx"
mkdir -p "$ngx/html" "$ngx/logs"
chmod 755 "$work" "$ngx" "$ngx/html"
echo "hello from nginx" >"$ngx/html/index.html"
cat >"$ngx/nginx.conf" <<EOF
daemon on; master_process on; worker_processes 4; pid $ngx/nginx.pid;
error_log $ngx/logs/error.log; events { worker_connections 64; }
http { access_log $ngx/logs/access.log; client_body_temp_path $ngx; proxy_temp_path $ngx;
  fastcgi_temp_path $ngx; uwsgi_temp_path $ngx; scgi_temp_path $ngx;
  server { listen 127.0.0.1:$port; root $ngx/html; } }
EOF
nginx -p "$ngx" -c "$ngx/nginx.conf" </dev/null
wait_up "http://127.0.0.1:$port/"
nroot=$(cat "$ngx/nginx.pid")
live="$nroot"
echo "nginx: master $nroot, 4 workers, port $port"
for _ in $(seq "$reps"); do measure nginx "$nroot" "http://127.0.0.1:$port/"; done

# --- Python prefork server
port=$(free_port)
# Not a child of this script (a zombie of ours would keep its pid taken):
# the subshell that starts it exits at once.
(python3 "$repo/integration/workloads/prefork_server.py" "$port" "$model_mib" 8 </dev/null >"$work/prefork.out" 2>&1 &)
wait_up "http://127.0.0.1:$port/"
proot=$(awk '/^ready/ { print $2 }' "$work/prefork.out")
live="$live $proot"
echo "prefork: master $proot, $model_mib MiB model, 8 workers, port $port"
for _ in $(seq "$reps"); do measure prefork "$proot" "http://127.0.0.1:$port/"; done

# --- Redis, 1M keys
port=$(free_port)
(redis-server --port "$port" --bind 127.0.0.1 --save "" --dir "$work" --daemonize no \
    --logfile "$work/redis.log" </dev/null >/dev/null 2>&1 &)
for _ in $(seq 200); do redis-cli -p "$port" PING >/dev/null 2>&1 && break; sleep 0.05; done
redis-cli -p "$port" EVAL "for i=1,1000000 do redis.call('SET','key:'..i,string.rep('v',64)..i) end return 1" 0 >/dev/null
rroot=$(redis-cli -p "$port" INFO server | awk -F: '/^process_id/ { print $2 }' | tr -d '\r')
live="$live $rroot"
echo "redis: pid $rroot, $(redis-cli -p "$port" DBSIZE) keys, port $port"
for _ in $(seq "$reps"); do measure redis "$rroot" -- redis-cli -p "$port" DBSIZE; done

# --- PostgreSQL 15, shared_buffers=256MB
pg=/usr/lib/postgresql/15/bin
if [ -x "$pg/initdb" ]; then
    port=$(free_port)
    mkdir -p "$work/pg" && chown postgres "$work/pg" && chmod 755 "$work"
    runuser -u postgres -- "$pg/initdb" -D "$work/pg/data" -A trust -U postgres >/dev/null
    runuser -u postgres -- "$pg/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w \
        -o "-p $port -k $work/pg -c listen_addresses=127.0.0.1 -c shared_buffers=256MB" start >/dev/null
    psql -X -q -h 127.0.0.1 -p "$port" -U postgres -c \
        "create table t as select i, md5(i::text) m from generate_series(1, 1000000) i; select count(*) from t;" >/dev/null
    proot=$(head -1 "$work/pg/data/postmaster.pid")
    live="$live $proot"
    echo "postgres: postmaster $proot, shared_buffers 256MB, 1M rows, port $port"
    for _ in $(seq "$reps"); do
        measure postgres "$proot" -- psql -X -A -t -h 127.0.0.1 -p "$port" -U postgres -c "select count(*) from t"
    done
    runuser -u postgres -- "$pg/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1 || true
fi

echo "medians over $reps runs:"
for name in nginx prefork redis postgres; do
    f() { awk -v n="$name" -v c="$1" '$1 == n { print $c }' "$work/figures" | median; }
    printf '%-8s dump %s s  restore %s s  PSS %s -> %s MiB\n' "$name" "$(f 2)" "$(f 3)" \
        "$(mib_of "$(f 4)")" "$(mib_of "$(f 5)")"
done
