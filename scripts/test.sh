#!/usr/bin/env bash
# The whole test suite: makes sure PostgreSQL is reachable, builds the binaries the end-to-end
# tests start, then runs every test of the workspace (nextest when installed, else cargo test).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-postgres.sh
# Deployment assets: promtool, kubernetes-validate, hadolint (installed when missing), then the
# static checks of deploy/; tests/tests/e2e/deploy.rs checks the metrics against real scrapes.
scripts/ensure-tools.sh
python3 scripts/check-deploy.py
# The cutover protocol's Promela model, checked exhaustively by spin with its mutants
# (docs/model/README.md).
scripts/check-model.sh
cargo build --workspace --bins --locked
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
