#!/usr/bin/env bash
# Start a tansu broker (memory storage) on 127.0.0.1:PORT unless something
# already listens there.  Usage: scripts/kafka-start.sh [PORT]   (default 9092)
# Log: .tools/tansu-PORT.log   PID: .tools/tansu-PORT.pid
set -euo pipefail

PORT=${1:-9092}
case $PORT in ''|*[!0-9]*) echo "kafka-start: invalid port '$PORT'" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=$ROOT/.tools
LOG=$TOOLS/tansu-$PORT.log
PIDFILE=$TOOLS/tansu-$PORT.pid

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

if port_open; then
  echo "tansu: already running on 127.0.0.1:$PORT"
  exit 0
fi

if [ ! -s "$TOOLS/tansu-bin" ] || [ ! -x "$(cat "$TOOLS/tansu-bin")" ]; then
  bash "$ROOT/scripts/kafka-setup.sh" >&2
fi
BIN=$(cat "$TOOLS/tansu-bin")

mkdir -p "$TOOLS"
rm -f "$PIDFILE"
URL=tcp://127.0.0.1:$PORT
# New session + SIGHUP ignored so the broker outlives this script and its
# terminal.  The inner shell records its own PID, then execs into tansu, so
# the PID file is right even if setsid has to fork.
setsid bash -c 'echo $$ >"$0"; exec nohup "$@"' "$PIDFILE" \
  "$BIN" broker --listener-url "$URL" --advertised-listener-url "$URL" \
  --storage-engine memory://tansu/ </dev/null >"$LOG" 2>&1 &
disown $! 2>/dev/null || true

deadline=$((SECONDS + 10))
while ! port_open; do
  pid=$(cat "$PIDFILE" 2>/dev/null || true)
  if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
    echo "kafka-start: tansu (pid $pid) exited before listening on 127.0.0.1:$PORT; log $LOG:" >&2
    tail -n 20 "$LOG" >&2 || true
    rm -f "$PIDFILE"
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "kafka-start: tansu did not accept connections on 127.0.0.1:$PORT within 10 s; log $LOG:" >&2
    tail -n 20 "$LOG" >&2 || true
    [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
    rm -f "$PIDFILE"
    exit 1
  fi
  sleep 0.05
done
echo "tansu: started on 127.0.0.1:$PORT (pid $(cat "$PIDFILE" 2>/dev/null || echo '?'), log $LOG)"
