#!/usr/bin/env bash
# The whole test suite: makes sure PostgreSQL is reachable, builds the binaries the end-to-end
# tests start, then runs every test of the workspace (nextest when installed, else cargo test).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-postgres.sh
cargo build --workspace --bins --locked
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
