#!/usr/bin/env bash
# Stop the tansu broker started by scripts/kafka-start.sh on PORT (default 9092).
# Uses SIGKILL: SIGTERM is graceful but takes ~5 s while clients are connected.
set -euo pipefail

PORT=${1:-9092}
case $PORT in ''|*[!0-9]*) echo "kafka-stop: invalid port '$PORT'" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PIDFILE=$ROOT/.tools/tansu-$PORT.pid

if [ ! -f "$PIDFILE" ]; then
  echo "tansu: no pid file for port $PORT, nothing to stop"
  exit 0
fi
pid=$(cat "$PIDFILE")
# kill -0 also succeeds for a zombie (PID 1 in a container may not reap it).
alive() { kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
if [ -n "$pid" ] && alive "$pid" &&
   tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q tansu; then
  kill -KILL "$pid"
  # Wait (bounded) for the process to go away so the port is free on return.
  for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.02; done
  echo "tansu: killed pid $pid (port $PORT)"
else
  echo "tansu: pid ${pid:-?} for port $PORT is not running"
fi
rm -f "$PIDFILE"
