#!/usr/bin/env bash
# Where a drain's time goes: stages EVENTS events over KEYS keys in one transaction, drains
# them with one release `outpost relay` (testing settings, no wake-ups), and prints the drain
# rate, the CPU seconds of the machine, the relay and the broker over the drain, and the
# relay's statements by total execution time (pg_stat_statements).
#
# It runs on a PostgreSQL of its own (port 55440, data in /tmp/outpost-drain-profile, with
# pg_stat_statements loaded; autovacuum off like the shared server) and a tansu broker of its
# own on 127.0.0.1:19092, so nothing else is measured with it.
#
#   cargo build --release -p outpost-cli
#   bash scripts/drain-profile.sh [EVENTS] [KEYS]      # default 100000 100000
#   bash scripts/drain-profile.sh stop                 # stop its PostgreSQL and broker
#   PLANS=5 bash scripts/drain-profile.sh ...          # also the plans of statements slower
#                                                      # than 5 ms (auto_explain), by shape
#   HEADERS=1 bash scripts/drain-profile.sh ...        # rows carry four envelope-like headers,
#                                                      # as `outpost bench` stages them
#   RELAYS=3 bash scripts/drain-profile.sh ...         # that many relays (CPU and peak RSS:
#                                                      # their sum, their largest)
#   SETUP_SQL="..." bash scripts/drain-profile.sh ...  # run after migrating, before staging
#                                                      # (an index or a table setting to try;
#                                                      # schema `profile`)
#   WAL=1 bash scripts/drain-profile.sh ...            # also the drain's WAL by record type
#                                                      # (pg_waldump --stats=record), and the
#                                                      # row locks it logged, per table
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PORT=55440
BROKER=127.0.0.1:19092
DIR=/tmp/outpost-drain-profile
BIN=${OUTPOST_BIN:-target/release/outpost}
PG_BIN=${OUTPOST_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
stop_broker() { pkill -f "listener-url tcp://$BROKER" || true; }

if [ "${1:-}" = stop ]; then
  stop_broker
  as_pg "$PG_BIN/pg_ctl" -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true
  exit 0
fi
EVENTS=${1:-100000}
KEYS=${2:-100000}
[ -x "$BIN" ] || { echo "drain-profile: $BIN is missing: run cargo build --release -p outpost-cli" >&2; exit 1; }
[ -f .tools/tansu-bin ] || { echo "drain-profile: no tansu binary: run make services" >&2; exit 1; }

if ! "$PG_BIN/pg_isready" -h 127.0.0.1 -p $PORT -q; then
  rm -rf "$DIR"; mkdir -p "$DIR"
  [ "$(id -u)" = 0 ] && chown postgres "$DIR"
  as_pg "$PG_BIN/initdb" -D "$DIR/data" -U postgres --auth=trust --no-sync >/dev/null
  as_pg "$PG_BIN/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w -o "-p $PORT -k $DIR \
    -c listen_addresses=127.0.0.1 -c autovacuum=off -c shared_buffers=128MB \
    -c shared_preload_libraries=pg_stat_statements,auto_explain" start >/dev/null
  psql -h 127.0.0.1 -p $PORT -U postgres -qc "CREATE DATABASE test"
  psql -h 127.0.0.1 -p $PORT -U postgres -d test -qc "CREATE EXTENSION pg_stat_statements"
fi
stop_broker; sleep 0.5
nohup "$(cat .tools/tansu-bin)" broker --listener-url "tcp://$BROKER" \
  --advertised-listener-url "tcp://$BROKER" --storage-engine memory://tansu/ \
  > "$DIR/tansu.log" 2>&1 &
sleep 1

export OUTPOST_DATABASE_URL="postgres://postgres@127.0.0.1:$PORT/test?options=-c%20jit%3Doff"
export OUTPOST_BROKERS=$BROKER
sql() { psql -h 127.0.0.1 -p $PORT -U postgres -d test -tAq "$@"; }
sql -c "DROP SCHEMA IF EXISTS profile CASCADE" 2>/dev/null
"$BIN" --schema profile --service profile migrate >/dev/null
[ -n "${SETUP_SQL:-}" ] && sql -v ON_ERROR_STOP=1 -c "$SETUP_SQL"
RELAYS_PIDS=()
for n in $(seq 1 "${RELAYS:-1}"); do
  "$BIN" --schema profile --service profile --environment testing --wake none relay > "$DIR/relay-$n.log" 2>&1 &
  RELAYS_PIDS+=($!)
done
trap 'kill "${RELAYS_PIDS[@]}" 2>/dev/null || true' EXIT
sleep 2
BROKER_PID=$(pgrep -f "listener-url tcp://$BROKER" | head -1)
cpu() { local sum=0; for p in "$@"; do sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $sum; }

if [ -n "${PLANS:-}" ]; then
  sql -c "ALTER SYSTEM SET auto_explain.log_min_duration = '${PLANS}ms'" \
    -c "ALTER SYSTEM SET auto_explain.log_analyze = on" -c "ALTER SYSTEM SET auto_explain.log_timing = off" \
    -c "SELECT pg_reload_conf()" >/dev/null
fi
# 1 KiB payloads; key rows included, as the bench stages them.
HEADERS_SQL="'{}'::jsonb"
[ -n "${HEADERS:-}" ] && HEADERS_SQL="jsonb_build_object('event_id', event_id::text, \
  'event_type', 'profile', 'trace_id', gen_random_uuid()::text, 'content_type', 'application/json')"
sql -c "BEGIN" -c "WITH staged AS ( \
    INSERT INTO profile.event_outbox (event_id, aggregate_type, aggregate_id, event_type, topic, event_key) \
    SELECT gen_random_uuid(), 'profile', key, 'profile', 'drain-profile', key \
    FROM (SELECT 'k-' || (i % $KEYS) AS key FROM generate_series(1, $EVENTS) i) g RETURNING id, event_id) \
  INSERT INTO profile.event_outbox_payloads (id, event_id, payload, headers) \
  SELECT id, event_id, convert_to(repeat('x', 1024), 'UTF8'), $HEADERS_SQL FROM staged" \
  -c "INSERT INTO profile.event_outbox_keys (event_key) \
      SELECT 'k-' || i FROM generate_series(0, least($KEYS, $EVENTS) - 1) i ON CONFLICT DO NOTHING" \
  -c "SELECT pg_stat_statements_reset()" -c "COMMIT" >/dev/null
[ -n "${WAL:-}" ] && WAL_FROM=$(sql -c "SELECT pg_current_wal_lsn()")
LOG_FROM=$(stat -c %s "$DIR/log")
T0=$(date +%s.%N); S0=$(head -1 /proc/stat); R0=$(cpu "${RELAYS_PIDS[@]}"); B0=$(cpu "$BROKER_PID")
# One session polls (a psql started every 0.1 s took a tenth of the machine's CPU): each
# statement of the loop reads a fresh snapshot; the pending index only. It commits each
# time round: a DO block without COMMIT held its first snapshot's xmin for the whole drain,
# so no row version the relay left behind was dead to all, and every claim's scan visited
# the heap for each key leased before it (the bench polls in short transactions).
sql -c "SET enable_seqscan = off" -c "DO \$\$ BEGIN \
    WHILE EXISTS (SELECT 1 FROM profile.event_outbox WHERE status = 'pending') LOOP \
      PERFORM pg_sleep(0.1); COMMIT; \
    END LOOP; END \$\$"
T1=$(date +%s.%N); S1=$(head -1 /proc/stat); R1=$(cpu "${RELAYS_PIDS[@]}"); B1=$(cpu "$BROKER_PID")
PEAK=$(for p in "${RELAYS_PIDS[@]}"; do cat "/proc/$p/status"; done | \
  awk '/VmHWM/ {if ($2 > m) m = $2} END {printf "%.1f MB", m / 1024}')

echo "$EVENTS events over $KEYS keys drained in $(echo "$T1 - $T0" | bc) s: \
$(echo "$EVENTS / ($T1 - $T0)" | bc) ev/s (end seen by a 0.1 s poll)"
echo "$S0 $S1" | awk -v r=$((R1 - R0)) -v b=$((B1 - B0)) '{
  busy0 = $2 + $3 + $4 + $7 + $8; all0 = busy0 + $5 + $6
  busy1 = $13 + $14 + $15 + $18 + $19; all1 = busy1 + $16 + $17
  printf "CPU seconds: machine %.2f busy of %.2f; relay %.2f; broker %.2f; the rest (PostgreSQL) %.2f\n",
    (busy1 - busy0) / 100, (all1 - all0) / 100, r / 100, b / 100, (busy1 - busy0 - r - b) / 100 }'
echo "relay peak RSS (VmHWM): $PEAK"
echo "statements by total execution time (calls | total ms | rows | ms per call | statement):"
sql -c "SELECT calls, round(total_exec_time::numeric), rows, \
    round((total_exec_time / greatest(calls, 1))::numeric, 2), \
    left(regexp_replace(query, '\s+', ' ', 'g'), 90) \
  FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat_statements%' \
  ORDER BY total_exec_time DESC LIMIT 8"

if [ -n "${WAL:-}" ]; then
  # Row locks are WAL records of their own: a `FOR UPDATE`, and an update whose new version
  # goes to another page (the old one is marked locked first).
  WAL_TO=$(sql -c "SELECT pg_current_wal_lsn()")
  waldump() { as_pg "$PG_BIN/pg_waldump" -p "$DIR/data/pg_wal" -s "$WAL_FROM" -e "$WAL_TO" "$@" 2>/dev/null; }
  echo "WAL of the drain by record type (pg_waldump --stats=record; count, record bytes, full-page image bytes):"
  waldump --stats=record | awk '$2 ~ /^[0-9]+$/ && $2 > 0 && $1 != "Total" {print $1, $2, $5, $8}' | sort -k2 -rn | head -8
  echo "row locks logged, by table:"
  waldump | grep "desc: LOCK" | grep -o "rel [0-9]*/[0-9]*/[0-9]*" | awk -F/ '{print $3}' | sort | uniq -c | \
    while read -r n node; do echo "$n $(sql -c "SELECT relname FROM pg_class WHERE relfilenode = $node")"; done
fi

if [ -n "${PLANS:-}" ]; then
  sql -c "ALTER SYSTEM RESET auto_explain.log_min_duration" -c "SELECT pg_reload_conf()" >/dev/null
  # A statement planned two ways shows twice: a plan that scans far more rows than the
  # statement names is the one to look at ($DIR/log has them in full).
  echo "plans slower than ${PLANS} ms (count | total ms | statement | plan nodes):"
  tail -c +$((LOG_FROM + 1)) "$DIR/log" | python3 -c '
import re, sys
shapes = {}
for entry in re.split(r"\n(?=\S.*LOG:  duration)", sys.stdin.read()):
    text = re.search(r"Query Text: (.{0,50})", entry)
    took = re.search(r"duration: ([\d.]+) ms", entry)
    if not (text and took):
        continue
    nodes = re.findall(r"(?:->|^\t)\s*([A-Z][A-Za-z ]+?)(?: on | using |  \()", entry, re.M)
    shapes.setdefault((text.group(1), " > ".join(nodes)), []).append(float(took.group(1)))
for (text, nodes), took in sorted(shapes.items(), key=lambda s: -sum(s[1])):
    print(f"{len(took)} | {sum(took):.0f} | {text} | {nodes[:200]}")
'
fi
