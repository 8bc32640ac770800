#!/usr/bin/env bash
# Build the local image kohakuriver/sshd:latest (OpenSSH server + rsync) on top of kohakuriver/debian:bookworm,
# without any registry. `docker build` runs apt inside the build container against the mirror baked into the
# base image; if the build cannot reach it, the same image is made with debootstrap --include=openssh-server,rsync
# into a second root filesystem (KR_SSHD_METHOD=debootstrap forces that path).
#
# The image has no entrypoint; its default command is /usr/local/sbin/kr-sshd, which creates the host keys
# when missing (each container gets its own: none are baked into the image), then runs sshd in the
# foreground. Root may log in with a key only; password authentication is off.
# Skips everything when the tag exists (KR_REBUILD=1 forces a rebuild).
set -euo pipefail
cd "$(dirname "$0")"

TAG="${KR_SSHD_IMAGE:-kohakuriver/sshd:latest}"
BASE="${KR_DEBIAN_IMAGE:-kohakuriver/debian:bookworm}"
CACHE_DIR="${KR_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kohakuriver/images}"

log() { printf '[sshd.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

command -v docker >/dev/null || die "the docker CLI is not installed"
docker info >/dev/null 2>&1 || die "cannot reach the Docker engine"
if image_exists "$TAG" && [ "${KR_REBUILD:-0}" != 1 ]; then
  log "$TAG already exists"
  exit 0
fi
mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/.sshd.lock"
flock 9
if image_exists "$TAG" && [ "${KR_REBUILD:-0}" != 1 ]; then
  log "$TAG already exists"
  exit 0
fi

WORK="$(mktemp -d "$CACHE_DIR/sshd-work.XXXXXX")"
ROOTFS="$WORK/rootfs"
cleanup() {
  if [ -d "$ROOTFS" ]; then
    awk -v root="$ROOTFS" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done
  fi
  rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

# The start script and sshd settings, shared by both build paths.
mkdir -p "$WORK/ctx"
cat >"$WORK/ctx/kr-sshd" <<'EOF'
#!/bin/sh
# Start sshd in the foreground: host keys are made on first start, so every container has its own.
set -e
ssh-keygen -A >/dev/null
mkdir -p /run/sshd /root/.ssh
chmod 0755 /run/sshd
chmod 0700 /root/.ssh
exec /usr/sbin/sshd -D -e "$@"
EOF
cat >"$WORK/ctx/kohakuriver.conf" <<'EOF'
# KohakuRiver VPS defaults: keys only.
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
EOF
# Run inside the new root filesystem (by RUN in the Dockerfile, or chroot on the debootstrap path).
cat >"$WORK/ctx/finish.sh" <<'EOF'
#!/bin/sh
set -e
install -m 0755 /tmp/ctx/kr-sshd /usr/local/sbin/kr-sshd
mkdir -p /etc/ssh/sshd_config.d /run/sshd /root/.ssh
install -m 0644 /tmp/ctx/kohakuriver.conf /etc/ssh/sshd_config.d/kohakuriver.conf
grep -q '^Include /etc/ssh/sshd_config.d/\*.conf' /etc/ssh/sshd_config \
  || sed -i '1i Include /etc/ssh/sshd_config.d/*.conf' /etc/ssh/sshd_config
chmod 0700 /root/.ssh
rm -f /etc/ssh/ssh_host_*
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb /usr/share/doc/* /usr/share/man/*
mkdir -p /var/lib/apt/lists/partial
EOF

build_with_docker() {
  bash ./debian.sh
  cat >"$WORK/ctx/Dockerfile" <<EOF
FROM $BASE
COPY . /tmp/ctx
RUN apt-get update -q \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-server rsync \\
 && sh /tmp/ctx/finish.sh \\
 && rm -rf /tmp/ctx
LABEL org.kohakuriver.image=sshd
CMD ["/usr/local/sbin/kr-sshd"]
EOF
  # The legacy builder resolves FROM against local images and needs no buildx plugin.
  DOCKER_BUILDKIT=0 docker build --pull=false -q -t "$TAG" "$WORK/ctx" >"$WORK/build.log" 2>&1 || {
    tail -n 20 "$WORK/build.log" >&2
    return 1
  }
}

build_with_debootstrap() {
  # Same mirror detection as debian.sh (its functions, not its build).
  # shellcheck source=/dev/null
  source <(sed -n '/^apt_sources()/,/^}/p;/^debian_mirror()/,/^}/p' ./debian.sh)
  SUITE=bookworm
  command -v debootstrap >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  }
  local mirror
  mirror="$(debian_mirror)"
  [ -n "$mirror" ] || die "no Debian mirror found in /etc/apt/sources.list(.d); set KR_DEBIAN_MIRROR"
  log "debootstrap $SUITE with openssh-server,rsync from $mirror"
  debootstrap --variant=minbase --include=procps,iproute2,ca-certificates,openssh-server,rsync \
    --components=main "$SUITE" "$ROOTFS" "$mirror" >"$WORK/debootstrap.log" 2>&1 || {
    tail -n 30 "$WORK/debootstrap.log" >&2
    die "debootstrap failed"
  }
  mkdir -p "$ROOTFS/tmp/ctx"
  cp "$WORK/ctx/kr-sshd" "$WORK/ctx/kohakuriver.conf" "$WORK/ctx/finish.sh" "$ROOTFS/tmp/ctx/"
  chroot "$ROOTFS" /bin/sh /tmp/ctx/finish.sh
  rm -rf "$ROOTFS/tmp/ctx"
  tar --numeric-owner -C "$ROOTFS" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf - . \
    | docker import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'LABEL org.kohakuriver.image=sshd' \
      --change 'CMD ["/usr/local/sbin/kr-sshd"]' \
      - "$TAG" >/dev/null
}

start=$(date +%s)
case "${KR_SSHD_METHOD:-build}" in
  build)
    if ! build_with_docker; then
      log "docker build failed (no network in build containers?); falling back to debootstrap"
      build_with_debootstrap
    fi
    ;;
  debootstrap) build_with_debootstrap ;;
  *) die "KR_SSHD_METHOD must be build or debootstrap" ;;
esac
log "built $TAG in $(($(date +%s) - start)) s"
