#!/usr/bin/env bash
# Build the Debian 12 (bookworm) VM base image for VM VPS, offline from Debian's packages: no cloud image, no
# nbd, no libguestfs, no loop device. debootstrap from the Debian mirror this machine's apt already uses, then
# `mkfs.ext4 -d` into a partition of a raw disk, GRUB written into the disk's boot sectors, and
# `qemu-img convert -O qcow2`.
#
#   bash scripts/images/vm-debian.sh [--rebuild] [OUT_DIR]
#
# Writes, in OUT_DIR (default: the cache dir of this build), the files of the image named debian-12 (the
# runner's VM_IMAGES_DIR holds <name>.qcow2):
#   debian-12.qcow2     2 GiB disk, MBR, one ext4 partition labelled kr-root; boots itself through GRUB (BIOS)
#   debian-12.vmlinuz   the same kernel and initrd, for a direct boot (-kernel/-initrd/-append), which skips
#   debian-12.initrd    the firmware and GRUB
#   debian-12.cmdline   the kernel command line for that direct boot
# and prints the path of debian-12.qcow2 on stdout (everything else goes to stderr).
#
# Inside: minbase + systemd, udev, dbus (logind turns QMP's system_powerdown into a clean shutdown), OpenSSH
# server, iproute2, sudo, cloud-init (NoCloud only) with cloud-guest-utils (growpart: an overlay bigger than
# the base gets its partition and file system grown at first boot), systemd-networkd and systemd-resolved
# (cloud-init renders the seed's network-config for networkd; resolved applies its DNS servers), Debian's
# generic kernel (its cloud kernel has no 9p; this one has virtio, ext4 and 9p over virtio), a small initrd, a
# serial console on ttyS0. No user keys, no SSH host keys (cloud-init writes the VPS's own from the seed),
# root's password locked, password logins off in sshd, an empty machine-id (each VM makes its own at first
# boot).
#
# The build is cached under ~/.cache/kohakuriver/images (KR_IMAGE_CACHE overrides): the debootstrap tree by a
# key of the suite and package list, the finished image by a key of this script's content; a cached image is
# only copied (or hard-linked) into OUT_DIR. --rebuild (or KR_REBUILD=1) makes the image again from the cached
# tree. KR_DEBIAN_MIRROR overrides the mirror read from apt's sources. Needs root (debootstrap, chroot).
set -euo pipefail

NAME=debian-12
SUITE=bookworm
# python3-cffi-backend is named because debootstrap cannot resolve the virtual package
# python3-cffi-backend-api-min that cloud-init's python3-cryptography needs.
PACKAGES="systemd-sysv,udev,dbus,openssh-server,iproute2,netbase,sudo,cloud-init,python3-cffi-backend"
# The generic kernel, not linux-image-cloud-amd64: Debian's cloud kernels (6.1 and backports' 6.12) are built
# without 9p (CONFIG_NET_9P unset), and the runner shares directories with the VM over 9p.
PACKAGES="$PACKAGES,cloud-guest-utils,systemd-resolved,linux-image-amd64,grub-pc-bin"
ROOT_LABEL=kr-root
DISK_SIZE_MIB=2048
PART_START_SECTOR=2048 # 1 MiB: the MBR, then GRUB's core image in the gap before the partition
CMDLINE="root=LABEL=$ROOT_LABEL ro console=tty0 console=ttyS0,115200n8"
CACHE_DIR="${KR_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kohakuriver/images}"
SELF="${BASH_SOURCE[0]}"

log() { printf '[vm-debian.sh] %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

REBUILD="${KR_REBUILD:-0}"
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rebuild) REBUILD=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$SELF" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
      exit 0
      ;;
    -*) die "unknown option: $1" ;;
    *)
      [ -z "$OUT" ] || die "only one output directory"
      OUT="$1"
      ;;
  esac
  shift
done

ARCH="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
[ "$ARCH" = amd64 ] || die "only amd64 hosts are supported (the image is x86_64 with a BIOS boot loader)"
TREE_KEY="$(printf '%s' "$SUITE minbase $PACKAGES" | sha256sum | cut -c1-12)"
IMAGE_KEY="$(sha256sum "$SELF" | cut -c1-12)"
# zstd packs and unpacks the tree about 3x and 5x faster than gzip -1 (and smaller); gzip where it is missing.
if command -v zstd >/dev/null; then
  TREE="$CACHE_DIR/vm-$SUITE-tree-$TREE_KEY.tar.zst"
  PACK=(zstd -q -T0 -3)
  UNPACK=(zstd -q -d -c)
else
  TREE="$CACHE_DIR/vm-$SUITE-tree-$TREE_KEY.tar.gz"
  PACK=(gzip -1)
  UNPACK=(gzip -d -c)
fi
BUILT="$CACHE_DIR/vm-$NAME-$IMAGE_KEY"
FILES=("$NAME.qcow2" "$NAME.vmlinuz" "$NAME.initrd" "$NAME.cmdline")

built() {
  local f
  for f in "${FILES[@]}"; do [ -s "$BUILT/$f" ] || return 1; done
}

# Copy the cached image into OUT_DIR (hard links where it is the same file system: the base is read-only to
# its users, who put qcow2 overlays on it).
publish() {
  local f
  if [ -n "$OUT" ]; then
    mkdir -p "$OUT"
    for f in "${FILES[@]}"; do
      if [ ! "$BUILT/$f" -ef "$OUT/$f" ]; then
        rm -f "$OUT/$f.part"
        ln "$BUILT/$f" "$OUT/$f.part" 2>/dev/null || cp "$BUILT/$f" "$OUT/$f.part"
        mv -f "$OUT/$f.part" "$OUT/$f"
      fi
    done
    realpath "$OUT/$NAME.qcow2"
  else
    realpath "$BUILT/$NAME.qcow2"
  fi
}

if built && [ "$REBUILD" != 1 ]; then
  log "$NAME is cached ($BUILT)"
  publish
  exit 0
fi

mkdir -p "$CACHE_DIR"
# One build at a time per cache dir (parallel test sessions may call this).
exec 9>"$CACHE_DIR/.vm-debian.lock"
flock 9
if built && [ "$REBUILD" != 1 ]; then
  log "$NAME is cached ($BUILT)"
  publish
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "building the image needs root (debootstrap, chroot)"
command -v qemu-img >/dev/null || die "qemu-img is not installed (scripts/setup.sh installs QEMU)"
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v sfdisk >/dev/null || need+=(fdisk)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The mirror: the first http(s) source of apt's that serves the release itself (as scripts/setup.sh reads
# them: from apt, one-line and deb822 files alike), never a host name written here.
debian_mirror() {
  if [ -n "${KR_DEBIAN_MIRROR:-}" ]; then
    printf '%s\n' "$KR_DEBIAN_MIRROR"
    return
  fi
  apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE) $(TARGET_OF)' 2>/dev/null \
    | awk -v suite="$SUITE" '$3 == "deb" && $2 == suite && $1 ~ /^https?:\/\// && $1 !~ /security/ { print $1; exit }'
}

WORK="$(mktemp -d "$CACHE_DIR/vm-work.XXXXXX")"
ROOTFS="$WORK/rootfs"
cleanup() {
  # debootstrap and our chroot steps mount /proc, /sys and /dev inside the tree; never delete through a mount.
  if [ -d "$ROOTFS" ]; then
    awk -v root="$ROOTFS" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done
  fi
  rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
start=$(date +%s)

# 1. The package tree: debootstrap, cached as a tarball (re-customizing does not download again).
if [ -s "$TREE" ]; then
  log "unpacking the cached tree $TREE"
  mkdir -p "$ROOTFS"
  "${UNPACK[@]}" "$TREE" | tar --numeric-owner -xf - -C "$ROOTFS"
else
  MIRROR="$(debian_mirror)"
  [ -n "$MIRROR" ] || die "no http(s) Debian mirror for $SUITE in apt's sources; set KR_DEBIAN_MIRROR"
  log "debootstrap $SUITE (minbase + $PACKAGES) from $MIRROR"
  debootstrap --variant=minbase --include="$PACKAGES" --components=main "$SUITE" "$ROOTFS" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || {
    tail -n 30 "$WORK/debootstrap.log" >&2
    die "debootstrap failed"
  }
  log "debootstrap took $(($(date +%s) - start)) s"
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin
  tar --numeric-owner -C "$ROOTFS" -cf - . | "${PACK[@]}" >"$TREE.part"
  mv "$TREE.part" "$TREE"
  find "$CACHE_DIR" -maxdepth 1 -name "vm-$SUITE-tree-*" ! -name "${TREE##*/}" -delete
  log "cached the tree ($(du -h "$TREE" | cut -f1))"
fi

# 2. Make it a VM image.
R="$ROOTFS"
KVER="$(basename "$(find "$R/lib/modules" -mindepth 1 -maxdepth 1 -type d | sort | tail -n 1)")"
[ -f "$R/boot/vmlinuz-$KVER" ] || die "no kernel in the tree"
CONFIG="$R/boot/config-$KVER"
# 9p for the runner's shared directories: built in or a module, either is fine; neither is a broken image.
for opt in CONFIG_NET_9P CONFIG_NET_9P_VIRTIO CONFIG_9P_FS CONFIG_VIRTIO_PCI CONFIG_VIRTIO_BLK CONFIG_VIRTIO_NET; do
  grep -Eq "^$opt=(y|m)$" "$CONFIG" || die "the kernel $KVER lacks $opt"
done

echo localhost >"$R/etc/hostname" # a placeholder: cloud-init sets the VPS's name from the seed
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$R/etc/hosts"
printf 'LABEL=%s\t/\text4\tdefaults,errors=remount-ro\t0\t1\n' "$ROOT_LABEL" >"$R/etc/fstab"
# Empty: systemd makes a machine-id at the first boot, so no two VMs of this image share one.
: >"$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id"
# No keys of any kind in the image: every VM gets its host key and its users' keys from its seed.
rm -f "$R"/etc/ssh/ssh_host_* "$R/root/.ssh/authorized_keys"
chroot "$R" passwd --lock root >/dev/null
mkdir -p "$R/etc/ssh/sshd_config.d"
cat >"$R/etc/ssh/sshd_config.d/90-kohakuriver-image.conf" <<'EOF'
# KohakuRiver VM image: public keys only, even before the seed's own drop-in is written.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
PermitRootLogin prohibit-password
EOF
# cloud-init: only the NoCloud seed (no metadata servers probed). Its network-config is applied: no
# "network: {config: disabled}" here. networkd renders it; resolved applies its DNS servers.
cat >"$R/etc/cloud/cloud.cfg.d/90-kohakuriver.cfg" <<'EOF'
datasource_list: [ NoCloud, None ]
EOF
chroot "$R" systemctl enable systemd-networkd.service systemd-resolved.service >/dev/null 2>&1
# network-online.target (cloud-init's network stage waits for it) once any link is up, and never more than
# 20 s: by default a VM with no configured NIC (no seed, or no NIC attached) stalls its boot for 2 minutes.
mkdir -p "$R/etc/systemd/system/systemd-networkd-wait-online.service.d"
cat >"$R/etc/systemd/system/systemd-networkd-wait-online.service.d/kohakuriver.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=20
EOF
# Small initrd: the virtio disk and NIC, ext4, 9p (as modules when the kernel has them as modules).
sed -i 's/^MODULES=.*/MODULES=list/' "$R/etc/initramfs-tools/initramfs.conf"
for m in virtio_pci virtio_blk virtio_net ext4 9pnet 9pnet_virtio 9p; do
  echo "$m"
done >"$R/etc/initramfs-tools/modules"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount --bind /dev "$R/dev"
chroot "$R" update-initramfs -u -k "$KVER" >/dev/null 2>&1 || die "update-initramfs failed"
# GRUB for BIOS: its modules in /boot/grub, a core image that finds them on the first partition, and a fixed
# grub.cfg that boots Debian's /vmlinuz and /initrd.img links (they follow kernel upgrades).
mkdir -p "$R/boot/grub/i386-pc"
cp "$R"/usr/lib/grub/i386-pc/*.mod "$R"/usr/lib/grub/i386-pc/*.lst "$R/boot/grub/i386-pc/"
chroot "$R" grub-mkimage -O i386-pc -o /boot/grub/i386-pc/core.img -p '(hd0,msdos1)/boot/grub' \
  biosdisk part_msdos ext2 || die "grub-mkimage failed"
cat >"$R/boot/grub/grub.cfg" <<EOF
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
menuentry 'Debian GNU/Linux (KohakuRiver VM image)' {
  insmod part_msdos
  insmod ext2
  set root=(hd0,msdos1)
  linux /vmlinuz $CMDLINE
  initrd /initrd.img
}
EOF
umount "$R/dev" "$R/sys" "$R/proc"
[ -e "$R/vmlinuz" ] && [ -e "$R/initrd.img" ] || die "the tree has no /vmlinuz and /initrd.img links"
mkdir -p "$WORK/out"
cp "$R/boot/vmlinuz-$KVER" "$WORK/out/$NAME.vmlinuz"
cp "$R/boot/initrd.img-$KVER" "$WORK/out/$NAME.initrd"
printf '%s\n' "$CMDLINE" >"$WORK/out/$NAME.cmdline"
cp "$R/boot/grub/i386-pc/core.img" "$WORK/core.img"
cp "$R/usr/lib/grub/i386-pc/boot.img" "$WORK/boot.img"
# Left out of the image: package lists and caches (back with the first `apt-get update`), logs of the build.
rm -rf "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/*.bin "$R"/var/cache/apt/archives/*.deb \
  "$R"/var/log/*.log "$R"/var/cache/debconf/*-old "$R"/var/lib/dpkg/*-old "$R"/boot/grub/i386-pc/core.img
mkdir -p "$R/var/lib/apt/lists/partial"

# 3. The disk: an MBR with one bootable Linux partition from 1 MiB to the end, the file system made from the
# tree straight into it, GRUB's boot sector (keeping the partition table) and core image before it.
DISK="$WORK/disk.raw"
truncate -s "${DISK_SIZE_MIB}M" "$DISK"
printf 'label: dos\nlabel-id: 0x4b526976\nstart=%d, type=83, bootable\n' "$PART_START_SECTOR" \
  | sfdisk --quiet "$DISK" >/dev/null
part_sectors=$((DISK_SIZE_MIB * 2048 - PART_START_SECTOR))
mkfs.ext4 -q -b 4096 -L "$ROOT_LABEL" -E offset=$((PART_START_SECTOR * 512)) -d "$R" "$DISK" "$((part_sectors / 8))" \
  || die "mkfs.ext4 failed"
core_sectors=$((($(stat -c %s "$WORK/core.img") + 511) / 512))
[ "$core_sectors" -lt "$PART_START_SECTOR" ] || die "GRUB's core image does not fit before the partition"
# boot.img's code is its first 440 bytes; the disk signature and partition table after it stay sfdisk's.
dd if="$WORK/boot.img" of="$DISK" bs=440 count=1 conv=notrunc status=none
# grub-mkimage's core image already points at its own second sector (2) and length, so at sector 1 it runs.
dd if="$WORK/core.img" of="$DISK" bs=512 seek=1 conv=notrunc status=none
qemu-img convert -O qcow2 "$DISK" "$WORK/out/$NAME.qcow2"
rm -f "$DISK"

rm -rf "$BUILT"
mv "$WORK/out" "$BUILT"
find "$CACHE_DIR" -maxdepth 1 -name "vm-$NAME-*" ! -name "${BUILT##*/}" -exec rm -rf {} +
log "built $NAME in $(($(date +%s) - start)) s: $(du -h "$BUILT/$NAME.qcow2" | cut -f1) qcow2, kernel $KVER"
publish
