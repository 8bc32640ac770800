#!/usr/bin/env bash
# The default environment (`DEFAULT_IMAGE` of the runner, `DEFAULT_CONTAINER_NAME` of the host):
# kohakuriver/kohakuriver-base:base, made from the local Debian image when it does not exist yet.
# Replace it with your lab's own image by tagging that image with the same name.
set -euo pipefail
TAG="kohakuriver/kohakuriver-base:base"
if docker image inspect "$TAG" >/dev/null 2>&1; then
  exit 0
fi
docker image inspect kohakuriver/debian:bookworm >/dev/null 2>&1 || bash "$(dirname "$0")/debian.sh"
docker tag kohakuriver/debian:bookworm "$TAG"
echo "tagged $TAG"
