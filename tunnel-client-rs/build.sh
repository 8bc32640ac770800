#!/usr/bin/env bash
# Build the static tunnel client and leave it at tunnel-client-rs/target/release/tunnel-client.
#
# .cargo/config.toml pins the target (x86_64-unknown-linux-gnu) and links glibc statically, so cargo puts
# the binary under target/x86_64-unknown-linux-gnu/release/; it is copied to target/release/ where the
# runner, setup.sh and the tests look for it. Crates come from crates.io, pinned by Cargo.lock.
set -euo pipefail
cd "$(dirname "$0")"
TARGET=x86_64-unknown-linux-gnu

if ! command -v cargo >/dev/null 2>&1; then
  echo "build.sh: cargo not found (install Rust with rustup)" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
  echo "build.sh: the $TARGET target is not installed (rustup target add $TARGET)" >&2
  exit 1
fi

cargo build --release --locked --target "$TARGET" --bin tunnel-client

built="target/$TARGET/release/tunnel-client"
mkdir -p target/release
# cp to a temporary name then rename: a running container may have the old binary bind-mounted.
cp "$built" target/release/tunnel-client.tmp
mv -f target/release/tunnel-client.tmp target/release/tunnel-client

linkage="$(ldd target/release/tunnel-client 2>&1 || true)"
if grep -q "not a dynamic executable" <<<"$linkage"; then
  echo "build.sh: target/release/tunnel-client is statically linked ($(du -h target/release/tunnel-client | cut -f1))"
else
  echo "build.sh: target/release/tunnel-client is not static:" >&2
  echo "$linkage" >&2
  exit 1
fi
