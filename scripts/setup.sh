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
APT_PACKAGES=(busybox-static debootstrap openssh-client openssh-server curl socat iproute2 iptables procps rsync ca-certificates file genisoimage iperf3)
# QEMU for VM VPS (the runner drives qemu-system-x86_64 over QMP; qemu-img makes the disks). Both packages must
# come from one suite: on bookworm that is bookworm-backports (QEMU 10), because the image may already carry
# qemu-utils from there, and qemu-system-x86 7.2 from plain bookworm would remove it.
QEMU_PACKAGES=(qemu-system-x86 qemu-utils)
is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
for p in "${APT_PACKAGES[@]}"; do is_installed "$p" || missing+=("$p"); done
qemu_missing=()
for p in "${QEMU_PACKAGES[@]}"; do is_installed "$p" || qemu_missing+=("$p"); done
CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
QEMU_SUITE=""
[ "$CODENAME" = bookworm ] && QEMU_SUITE=bookworm-backports
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
# The configured sources as "URI SUITE" lines (from apt itself: one-line and deb822 files alike).
apt_suites() { apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE) $(TARGET_OF)' | awk '$3 == "deb" {print $1, $2}' | sort -u; }
if [ ${#missing[@]} -gt 0 ] || [ ${#qemu_missing[@]} -gt 0 ]; then
  if [ ${#qemu_missing[@]} -gt 0 ] && [ -n "$QEMU_SUITE" ] && ! apt_suites | grep -q " $QEMU_SUITE\$"; then
    # Backports of the mirror this machine already uses (never a hard-coded host).
    mirror=$(apt_suites | awk -v s="$CODENAME" '$2 == s {print $1; exit}')
    if [ -z "$mirror" ]; then
      echo "no apt source for $CODENAME: cannot add $QEMU_SUITE for QEMU" >&2; exit 1
    fi
    log "adding $QEMU_SUITE of $mirror to apt's sources"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    {
      echo "Types: deb"; echo "URIs: $mirror"; echo "Suites: $QEMU_SUITE"; echo "Components: main"
      [ -f "$keyring" ] && echo "Signed-By: $keyring"
    } | $SUDO tee /etc/apt/sources.list.d/kohakuriver-backports.sources >/dev/null
  fi
  log "installing system packages: ${missing[*]} ${qemu_missing[*]}"
  $SUDO apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  if [ ${#qemu_missing[@]} -gt 0 ]; then
    # Both named even when one is present, so that they end up from the same suite.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      ${QEMU_SUITE:+-t "$QEMU_SUITE"} "${QEMU_PACKAGES[@]}"
  fi
fi
qemu-img --version >/dev/null || { echo "qemu-img does not run after installing QEMU" >&2; exit 1; }

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
