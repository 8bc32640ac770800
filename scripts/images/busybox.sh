#!/usr/bin/env bash
# Build the local image kohakuriver/busybox:latest (no registry needed): a root filesystem made from Debian's
# busybox-static package, imported with `docker import`. Tests run the static tunnel client and small
# services (nc, httpd) in it. Skips all work when the tag already exists; KR_REBUILD=1 rebuilds.
set -euo pipefail
TAG="${KR_BUSYBOX_IMAGE:-kohakuriver/busybox:latest}"

image_exists() { [ "${KR_REBUILD:-0}" != 1 ] && docker image inspect "$TAG" >/dev/null 2>&1; }
if image_exists; then
  echo "busybox.sh: $TAG already exists"
  exit 0
fi
# One build at a time (test sessions running in parallel may all find the image missing).
LOCK_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/kohakuriver/images"
mkdir -p "$LOCK_DIR"
exec 9>"$LOCK_DIR/.busybox.lock"
flock 9
if image_exists; then
  echo "busybox.sh: $TAG already exists"
  exit 0
fi

if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed"; then
  echo "busybox.sh: installing busybox-static"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends busybox-static
fi
BUSYBOX="$(dpkg -L busybox-static | grep -E '/bin/busybox$' | head -n1)"
BUSYBOX="${BUSYBOX:-/bin/busybox}"
[ -x "$BUSYBOX" ] || { echo "busybox.sh: no busybox binary at $BUSYBOX" >&2; exit 1; }

ROOT="$(mktemp -d)"
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,etc,tmp,root,proc,sys,dev,run,var/log,var/www,home}
chmod 1777 "$ROOT/tmp"
chmod 0700 "$ROOT/root"
cp "$BUSYBOX" "$ROOT/bin/busybox"
chmod 0755 "$ROOT/bin/busybox"

# One symlink per applet, at the path busybox itself reports (/bin/sh, /bin/nc, /usr/sbin/httpd, ...).
"$ROOT/bin/busybox" --list-full | while read -r applet; do
  [ -n "$applet" ] || continue
  mkdir -p "$ROOT/$(dirname "$applet")"
  [ -e "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
done
for needed in bin/sh bin/cat bin/sleep bin/echo bin/ls usr/bin/nc usr/sbin/httpd; do
  [ -e "$ROOT/$needed" ] || [ -L "$ROOT/$needed" ] || { echo "busybox.sh: applet $needed missing" >&2; exit 1; }
done

cat > "$ROOT/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat > "$ROOT/etc/group" <<'GROUP'
root:x:0:
nogroup:x:65534:
GROUP
printf 'root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n' > "$ROOT/etc/shadow"
chmod 0640 "$ROOT/etc/shadow"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$ROOT/etc/hosts"
printf 'hosts: files dns\n' > "$ROOT/etc/nsswitch.conf"
echo "kohakuriver busybox test image" > "$ROOT/var/www/index.html"

tar -C "$ROOT" --numeric-owner --owner=0 --group=0 -c . |
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'WORKDIR /root' \
    --change 'CMD ["/bin/sh"]' \
    --message "rootfs from Debian busybox-static ($(dpkg-query -W -f='${Version}' busybox-static))" \
    - "$TAG" >/dev/null
echo "busybox.sh: built $TAG"
