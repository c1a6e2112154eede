#!/usr/bin/env bash
# What PostgreSQL spends per event of a drain under three ways of owning keys, measured in
# psql alone (no relay, no broker, a core to itself): 100,000 one-event keys, 1 KiB payloads
# and four headers, in Outpost's own tables (`outpost migrate`), drained 500 rows a cycle
# with a commit after every statement, as a relay's statements would be:
#
#   keys     today's relay: lease 500 free keys and read their rows (one statement, the rows
#            locked), mark the rows published, try-lock and delete the drained key rows;
#   hybrid   one owner of a whole range of keys (hash ranges leased as one row each, not
#            modelled): read pending rows in id order, skipping keys another owner leased or
#            that back off; mark them published; delete the drained key rows as today;
#   ranges   the same without key rows at all: read in id order, mark published.
#
# The last two need an index of pending rows by id, created for them. Each model runs on a
# freshly staged backlog after a CHECKPOINT; the models alternate, ROUNDS times.
#
#   cargo build --release -p outpost-cli
#   bash scripts/ownership-models.sh [ROUNDS]           # default 3
#
# OUTPOST_DATABASE_URL picks the server (default the shared one); schema `ownership_models`,
# dropped at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROUNDS=${1:-3}
BIN=${OUTPOST_BIN:-target/release/outpost}
export OUTPOST_DATABASE_URL=${OUTPOST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
[ -x "$BIN" ] || { echo "ownership-models: $BIN is missing: run cargo build --release -p outpost-cli" >&2; exit 1; }
S=ownership_models
T=$S.event_outbox
P=$S.event_outbox_payloads
K=$S.event_outbox_keys
sql() { psql "$OUTPOST_DATABASE_URL" -v ON_ERROR_STOP=1 -tAq "$@"; }
trap 'sql -c "DROP SCHEMA IF EXISTS $S CASCADE" 2>/dev/null || true' EXIT

stage() {
  sql -c "DROP SCHEMA IF EXISTS $S CASCADE" 2>/dev/null
  "$BIN" --schema $S --service $S migrate >/dev/null
  sql -c "WITH staged AS ( \
      INSERT INTO $T (event_id, aggregate_type, aggregate_id, event_type, topic, event_key) \
      SELECT gen_random_uuid(), 'model', 'k-' || i, 'model', 'model', 'k-' || i \
      FROM generate_series(1, 100000) i RETURNING id, event_id) \
    INSERT INTO $P (id, event_id, payload, headers) \
    SELECT id, event_id, convert_to(repeat('x', 1024), 'UTF8'), \
      jsonb_build_object('event_id', event_id::text, 'event_type', 'model', \
        'trace_id', gen_random_uuid()::text, 'content_type', 'application/json') FROM staged"
  case $1 in
    keys) sql -c "INSERT INTO $K (event_key) SELECT 'k-' || i FROM generate_series(1, 100000) i" ;;
    hybrid) sql -c "INSERT INTO $K (event_key) SELECT 'k-' || i FROM generate_series(1, 100000) i" \
                -c "CREATE INDEX ON $T (id) WHERE status = 'pending'" ;;
    ranges) sql -c "CREATE INDEX ON $T (id) WHERE status = 'pending'" ;;
  esac
  sql -c "ANALYZE $T" -c "ANALYZE $P" -c "ANALYZE $K" -c "CHECKPOINT"
}

# The statements run through EXECUTE, so each is planned for its values, as the relay's are.
# The hybrid's look-up of a row's key is a scalar subquery, so it stays a probe of the key's
# row: written as NOT EXISTS it was planned as a scan of every key row per read.
SETTLE="UPDATE $T t SET status = 'published', published_at = clock_timestamp(), \
  attempts = t.attempts + 1, last_error = NULL, kafka_partition = 0, kafka_offset = u.id \
  FROM UNNEST(\$1) AS u(id) WHERE t.id = u.id AND t.id = ANY(ARRAY(SELECT unnest(\$1))) \
  AND t.status <> 'published' AND t.status <> 'dead'"
TRY_LOCK="SELECT count(*) FROM UNNEST(\$1) AS key \
  WHERE pg_try_advisory_xact_lock(hashtextextended('$S' || key, 0))"
DELETE_DRAINED="DELETE FROM $K k WHERE k.event_key = ANY(ARRAY(SELECT unnest(\$1))) \
  AND (k.lease_owner IS NULL OR k.lease_owner = \$2) AND NOT EXISTS ( \
    SELECT 1 FROM $T e WHERE e.status = 'pending' AND e.event_key = k.event_key)"

run() {
  local read
  case $1 in
    keys) read="WITH free AS ( \
        SELECT event_key FROM $K WHERE next_attempt_at <= now() \
          AND (lease_until IS NULL OR lease_until < now()) \
        ORDER BY next_attempt_at LIMIT 500 FOR UPDATE SKIP LOCKED), \
      leased AS ( \
        UPDATE $K k SET lease_owner = \$2, lease_until = now() + interval '90 s', \
          next_attempt_at = now() + interval '90 s', backoff_transient = false \
        WHERE k.event_key = ANY(ARRAY(SELECT event_key FROM free)) RETURNING k.event_key) \
      SELECT array_agg(e.id), array_agg(leased.event_key), 0::bigint FROM leased \
      LEFT JOIN LATERAL (SELECT e.*, p.payload, p.headers::text AS headers \
        FROM $T e JOIN $P p ON p.id = e.id \
        WHERE e.status = 'pending' AND e.event_key = leased.event_key \
        ORDER BY e.id LIMIT 500 FOR UPDATE OF e) e ON true" ;;
    hybrid) read="SELECT array_agg(id), array_agg(event_key), max(id) FROM ( \
        SELECT e.id, e.event_key, p.payload, p.headers::text AS headers \
        FROM $T e JOIN $P p ON p.id = e.id \
        WHERE e.status = 'pending' AND e.id > \$1 AND p.id > \$1 \
          AND NOT COALESCE((SELECT (k.lease_owner <> \$2 AND k.lease_until > now()) \
                                   OR k.next_attempt_at > now() \
                            FROM $K k WHERE k.event_key = e.event_key), false) \
        ORDER BY e.id LIMIT 500) r" ;;
    ranges) read="SELECT array_agg(id), array_agg(event_key), max(id) FROM ( \
        SELECT e.id, e.event_key, p.payload, p.headers::text AS headers \
        FROM $T e JOIN $P p ON p.id = e.id \
        WHERE e.status = 'pending' AND e.id > \$1 AND p.id > \$1 \
        ORDER BY e.id LIMIT 500) r" ;;
  esac
  local delete=""
  [ "$1" != ranges ] && delete="t0 := clock_timestamp(); \
      EXECUTE \$q\$$TRY_LOCK\$q\$ USING keys; \
      EXECUTE \$q\$$DELETE_DRAINED\$q\$ USING keys, me; COMMIT; \
      td := td + extract(epoch FROM clock_timestamp() - t0);"
  sql -c "DO \$do\$ DECLARE me uuid := gen_random_uuid(); ids bigint[]; keys text[]; \
      last bigint := 0; t0 timestamptz; tr float8 := 0; ts float8 := 0; td float8 := 0; n int := 0; \
    BEGIN LOOP \
      t0 := clock_timestamp(); \
      EXECUTE \$q\$$read\$q\$ INTO ids, keys, last USING last, me; COMMIT; \
      tr := tr + extract(epoch FROM clock_timestamp() - t0); \
      EXIT WHEN ids IS NULL OR ids[1] IS NULL; \
      t0 := clock_timestamp(); \
      EXECUTE \$q\$$SETTLE\$q\$ USING ids; COMMIT; \
      ts := ts + extract(epoch FROM clock_timestamp() - t0); \
      $delete \
      n := n + cardinality(ids); \
    END LOOP; \
    RAISE NOTICE '%', format('%-7s %s rows: read %s s, settle %s s, key-row delete %s s; %s µs a row', \
      '$1', n, round(tr::numeric, 2), round(ts::numeric, 2), round(td::numeric, 2), \
      round(((tr + ts + td) * 1e6 / greatest(n, 1))::numeric, 1)); \
    END \$do\$" 2>&1 | sed -n 's/.*NOTICE:  //p'
}

for _ in $(seq 1 "$ROUNDS"); do
  for model in keys hybrid ranges; do
    stage $model
    run $model
  done
done
