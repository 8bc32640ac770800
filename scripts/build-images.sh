#!/usr/bin/env bash
# Build the local container images the project and its tests use (no registry needed). Each script
# skips its work when its tag already exists, so this is quick after the first run.
#   kohakuriver/busybox:latest          busybox-static only: the smallest image, used by most tests
#   kohakuriver/debian:bookworm         debootstrap minbase
#   kohakuriver/sshd:latest             Debian + OpenSSH server + rsync: SSH-ready VPS image
#   kohakuriver/kohakuriver-base:base   the default environment of tasks that name no image
# and the VM base image debian-12.qcow2 (scripts/images/vm-debian.sh: about 3 minutes the first time, then
# cached under ~/.cache/kohakuriver/images; KR_SKIP_VM_IMAGE=1 leaves it out).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/images/busybox.sh
bash scripts/images/debian.sh
bash scripts/images/sshd.sh
bash scripts/images/base.sh
if [ "${KR_SKIP_VM_IMAGE:-0}" != 1 ]; then
  bash scripts/images/vm-debian.sh >/dev/null
fi
