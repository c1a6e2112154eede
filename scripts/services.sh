#!/usr/bin/env bash
# Make a (fresh) Debian machine ready for outpost's demo and tests, and start
# whatever is not running yet.  Idempotent: a second run changes nothing.
#   PostgreSQL  127.0.0.1:5432  (user postgres, trust auth, database "test")
#   Redis       127.0.0.1:6379
#   tansu       127.0.0.1:9092  (Kafka protocol, memory storage)
#   prometheus  installed only (prometheus + promtool): tests start their own server
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi

APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" -eq 0 ]; then
    "${SUDO[@]}" apt-get update -qq
    APT_UPDATED=1
  fi
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

# Run a command as the postgres OS user (peer auth on the Unix socket).
as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then
    su postgres -s /bin/bash -c "cd / && $(printf '%q ' "$@")"
  else
    (cd / && sudo -u postgres "$@")
  fi
}

# wait_for SECONDS NAME CHECK...: poll CHECK until it succeeds or the deadline passes.
wait_for() {
  local secs=$1 name=$2
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "services: $name did not come up within ${secs} s" >&2
      return 1
    fi
    sleep 0.2
  done
}

# ---------------------------------------------------------------- PostgreSQL
PG_HOST=127.0.0.1
PG_PORT=5432

pg_up() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
  else
    (exec 3<>"/dev/tcp/$PG_HOST/$PG_PORT") 2>/dev/null
  fi
}

# psql as postgres over TCP with no password: succeeds only with trust auth.
pg_trust_psql() {
  env -u PGPASSWORD -u PGPASSFILE PGCONNECT_TIMEOUT=5 \
    psql -X -w -q -U postgres -h "$PG_HOST" -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 "$@"
}

pg_latest_version() { ls /etc/postgresql 2>/dev/null | sort -V | tail -1; }

pg_start_cluster() {
  local ver
  ver=$(pg_latest_version)
  if [ ! -d "/etc/postgresql/$ver/main" ]; then
    "${SUDO[@]}" pg_createcluster "$ver" main >/dev/null
  fi
  # Exit status 2 means "already running" (e.g. on another address); the wait below decides.
  "${SUDO[@]}" pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
}

pg_status=""
if pg_up; then
  pg_status="already running"
else
  if [ -n "$(pg_latest_version)" ]; then
    pg_status="started cluster $(pg_latest_version)/main"
  else
    apt_install postgresql >/dev/null
    pg_status="installed and started cluster $(pg_latest_version)/main"
  fi
  # The package's postinst may have started the cluster already.
  pg_up || pg_start_cluster
  wait_for 30 postgres pg_up
fi

if ! command -v psql >/dev/null 2>&1; then
  apt_install postgresql-client >/dev/null
fi

# Trust auth for postgres over 127.0.0.1 (only touch pg_hba.conf if it is missing).
if ! pg_trust_psql -c 'SELECT 1' >/dev/null 2>&1; then
  hba=$(as_postgres psql -X -At -p "$PG_PORT" -c 'SHOW hba_file' 2>/dev/null || true)
  if [ -z "$hba" ]; then
    hba=/etc/postgresql/$(pg_latest_version)/main/pg_hba.conf
  fi
  if [ ! -f "$hba" ]; then
    echo "services: postgres rejects trust login over 127.0.0.1 and pg_hba.conf was not found" >&2
    exit 1
  fi
  # pg_hba.conf is first-match: put the trust lines at the top.
  tmp=$(mktemp)
  {
    echo "# added by outpost scripts/services.sh: passwordless postgres over loopback"
    echo "host    all    postgres    127.0.0.1/32    trust"
    echo "host    all    postgres    ::1/128         trust"
    "${SUDO[@]}" cat "$hba"
  } >"$tmp"
  "${SUDO[@]}" cp "$hba" "$hba.outpost.bak"
  "${SUDO[@]}" sh -c 'cat "$1" > "$2"' _ "$tmp" "$hba"
  rm -f "$tmp"
  as_postgres psql -X -q -p "$PG_PORT" -c 'SELECT pg_reload_conf()' >/dev/null
  wait_for 10 "postgres trust auth" pg_trust_psql -c 'SELECT 1' >/dev/null 2>&1 || {
    echo "services: postgres still rejects trust login as postgres over 127.0.0.1 (see $hba)" >&2
    exit 1
  }
  pg_status="$pg_status; enabled trust auth in $hba"
fi

if [ "$(pg_trust_psql -At -c "SELECT 1 FROM pg_database WHERE datname = 'test'")" != 1 ]; then
  pg_trust_psql -c 'CREATE DATABASE test' >/dev/null
  pg_status="$pg_status; created database test"
fi
echo "postgres: $pg_status ($PG_HOST:$PG_PORT)"

# --------------------------------------------------------------------- Redis
REDIS_PORT=6379

redis_up() {
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(timeout 5 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]
  else
    timeout 5 bash -c '
      exec 3<>"/dev/tcp/127.0.0.1/$0" || exit 1
      printf "PING\r\n" >&3
      IFS= read -r line <&3
      [[ $line == +PONG* ]]' "$REDIS_PORT" 2>/dev/null
  fi
}

redis_start() {
  local dir
  if [ -d /var/lib/redis ] && [ -w /var/lib/redis ]; then
    dir=/var/lib/redis
  else
    dir=${TMPDIR:-/tmp}/outpost-redis
    mkdir -p "$dir"
  fi
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
    --save "" --appendonly no --dir "$dir" --logfile "$dir/redis-$REDIS_PORT.log" >/dev/null
}

redis_status=""
if redis_up; then
  redis_status="already running"
else
  if command -v redis-server >/dev/null 2>&1; then
    redis_status="started"
  else
    apt_install redis-server >/dev/null
    redis_status="installed and started"
  fi
  # The package's postinst may have started a server already.
  redis_up || redis_start
  wait_for 30 redis redis_up
fi
echo "redis: $redis_status (127.0.0.1:$REDIS_PORT)"

# ---------------------------------------------------------------- Prometheus
# Tests run their own prometheus (temporary config and data, free port) against a
# relay, and `make test` runs promtool on deploy/prometheus/. The package's own service
# is not wanted: it would hold port 9090 and scrape nothing of ours.
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  prom_status="already installed"
else
  apt_install --no-install-recommends prometheus >/dev/null
  prom_status="installed"
  if [ -d /run/systemd/system ]; then
    "${SUDO[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi
echo "prometheus: $prom_status ($(prometheus --version 2>&1 | head -1))"

# --------------------------------------------------------------------- tansu
bash "$ROOT/scripts/kafka-setup.sh"
bash "$ROOT/scripts/kafka-start.sh" 9092
