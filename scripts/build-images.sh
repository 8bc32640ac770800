#!/usr/bin/env bash
# Build the local container images the project and its tests use (no registry needed).
# Each script in scripts/images/ builds one image and skips the work when its tag already exists.
set -euo pipefail
cd "$(dirname "$0")/.."
for script in scripts/images/*.sh; do
  [ -e "$script" ] || continue
  bash "$script"
done
