#!/usr/bin/env bash
# Set everything up on this machine and start a single-machine cluster.
#   bash scripts/setup.sh              install, build, then start `kr up` in the foreground
#   bash scripts/setup.sh --no-start   install and build only (what CI uses)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
START=1
for arg in "$@"; do
  case "$arg" in
    --no-start) START=0 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# 1. System packages (Debian). Only what is missing is installed.
APT_PACKAGES=(busybox-static debootstrap openssh-client openssh-server curl socat iproute2 rsync ca-certificates file)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# 2. Python environment.
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
log "installing kohakuriver into .venv"
.venv/bin/pip install -q --upgrade pip
# compat: a plain path entry instead of setuptools' editable finder, which every Python start in the venv
# would import (measured: `python -c pass` 45 ms with the finder, 19 ms without; `kr` pays it per command).
# setuptools calls that mode transitional: where a future one refuses it, the default mode still works.
.venv/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat 2>/dev/null \
  || .venv/bin/pip install -q -e '.[test]'

# 3. The Rust tunnel client (static binary).
if [ -f tunnel-client-rs/Cargo.toml ]; then
  log "building the tunnel client"
  bash tunnel-client-rs/build.sh
fi

# 4. Local container images (no registry is needed).
if [ -f scripts/build-images.sh ]; then
  log "building local images"
  bash scripts/build-images.sh
fi

if [ "$START" -eq 1 ]; then
  if .venv/bin/kr up --help >/dev/null 2>&1; then
    log "starting a single-machine cluster (Ctrl-C stops it)"
    exec .venv/bin/kr up
  fi
  .venv/bin/kr --help
fi
