#!/usr/bin/env bash
# Run the whole test suite: lint, Python tests (unit, property and end-to-end), Rust tests.
# Extra arguments go to pytest (e.g. `-m "not slow"` for a quick run).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if [ -f tunnel-client-rs/Cargo.toml ]; then
  (cd tunnel-client-rs && cargo test --release)
fi
.venv/bin/python -m pytest "$@"
