#!/usr/bin/env bash
# Build the local image kohakuriver/debian:bookworm without any registry: debootstrap (variant minbase) from
# the Debian mirror this machine's apt already uses, then `docker import`.
#   - skips everything when the tag exists (KR_REBUILD=1 forces a rebuild);
#   - keeps the root filesystem tarball in the cache dir, so a re-import after `docker image rm` is quick;
#   - KR_DEBIAN_MIRROR overrides the mirror read from /etc/apt/sources.list(.d).
set -euo pipefail

TAG="${KR_DEBIAN_IMAGE:-kohakuriver/debian:bookworm}"
SUITE=bookworm
PACKAGES="procps,iproute2,ca-certificates"  # coreutils and bash are part of minbase
CACHE_DIR="${KR_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kohakuriver/images}"

log() { printf '[debian.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

command -v docker >/dev/null || die "the docker CLI is not installed"
docker info >/dev/null 2>&1 || die "cannot reach the Docker engine"
if image_exists "$TAG" && [ "${KR_REBUILD:-0}" != 1 ]; then
  log "$TAG already exists"
  exit 0
fi

mkdir -p "$CACHE_DIR"
# One build at a time per cache dir (parallel test sessions may call this).
exec 9>"$CACHE_DIR/.debian.lock"
flock 9
if image_exists "$TAG" && [ "${KR_REBUILD:-0}" != 1 ]; then
  log "$TAG already exists"
  exit 0
fi

ARCH="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
KEY="$(printf '%s' "$SUITE $PACKAGES" | sha256sum | cut -c1-12)"
TARBALL="$CACHE_DIR/debian-$SUITE-minbase-$ARCH-$KEY.tar.gz"

# Print "URI SUITE" for every enabled binary source in one-line (.list) and deb822 (.sources) files.
apt_sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" && NF >= 3 { print $2, $3 }'
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'BEGIN { RS = ""; FS = "\n" }
      {
        types = ""; uris = ""; suites = ""; enabled = "yes"
        for (i = 1; i <= NF; i++) {
          line = $i
          if (line ~ /^[ \t]*#/) continue
          if (line ~ /^Types:/)   { sub(/^Types:[ \t]*/, "", line);   types = line }
          if (line ~ /^URIs:/)    { sub(/^URIs:[ \t]*/, "", line);    uris = line }
          if (line ~ /^Suites:/)  { sub(/^Suites:[ \t]*/, "", line);  suites = line }
          if (line ~ /^Enabled:/) { sub(/^Enabled:[ \t]*/, "", line); enabled = line }
        }
        if (enabled == "no" || (" " types " ") !~ / deb /) next
        nu = split(uris, u, /[ \t]+/); ns = split(suites, s, /[ \t]+/)
        for (a = 1; a <= nu; a++) for (b = 1; b <= ns; b++) if (u[a] != "" && s[b] != "") print u[a], s[b]
      }' "$f"
  done
}

# The mirror: a source that serves the release itself (not -updates/-security/-backports), preferring one
# that names bookworm. Only http(s) mirrors can feed debootstrap.
debian_mirror() {
  if [ -n "${KR_DEBIAN_MIRROR:-}" ]; then
    printf '%s\n' "$KR_DEBIAN_MIRROR"
    return
  fi
  apt_sources | awk -v suite="$SUITE" '
    $1 ~ /^https?:\/\// && $1 !~ /security/ && $2 !~ /-/ {
      if ($2 == suite && exact == "") exact = $1
      if (any == "") any = $1
    }
    END { if (exact != "") print exact; else if (any != "") print any }'
}

if [ ! -s "$TARBALL" ]; then
  if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  fi
  [ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
  MIRROR="$(debian_mirror)"
  [ -n "$MIRROR" ] || die "no Debian mirror found in /etc/apt/sources.list(.d); set KR_DEBIAN_MIRROR"

  WORK="$(mktemp -d "$CACHE_DIR/debian-work.XXXXXX")"
  ROOTFS="$WORK/rootfs"
  cleanup() {
    # debootstrap mounts /proc and /sys inside the target; never delete through a mount.
    if [ -d "$ROOTFS" ]; then
      awk -v root="$ROOTFS" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null || true
      done
    fi
    rm -rf --one-file-system "$WORK"
  }
  trap cleanup EXIT

  log "debootstrap $SUITE (minbase + $PACKAGES) from $MIRROR"
  start=$(date +%s)
  debootstrap --variant=minbase --include="$PACKAGES" --components=main "$SUITE" "$ROOTFS" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
  log "debootstrap took $(($(date +%s) - start)) s"

  # Keep the image small; the package lists come back with the first `apt-get update`.
  rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
    "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/var/log/*.log \
    "$ROOTFS"/var/cache/debconf/*-old "$ROOTFS"/var/lib/dpkg/*-old
  mkdir -p "$ROOTFS/var/lib/apt/lists/partial"
  # The engine provides /dev, /proc, /sys, hostname and resolver configuration at run time.
  tar --numeric-owner -C "$ROOTFS" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf - . \
    | gzip -1 >"$TARBALL.part"
  mv "$TARBALL.part" "$TARBALL"
  log "cached $(du -h "$TARBALL" | cut -f1) root filesystem at $TARBALL"
fi

log "importing $TARBALL as $TAG"
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'LABEL org.kohakuriver.image=debian' \
  --change 'CMD ["/bin/bash"]' \
  "$TARBALL" "$TAG" >/dev/null
log "built $TAG"
