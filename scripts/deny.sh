#!/usr/bin/env bash
# Supply-chain checks with cargo-deny (deny.toml): licenses, banned crates, registries.
# Advisories need the RustSec database cloned from GitHub; where it can be reached, pass
# `--advisories` to check them too. Not part of .ci/run: installing cargo-deny from source took
# about 19 minutes on the project machine (see docs/reliability.md).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deny --version >/dev/null 2>&1; then
  echo "cargo-deny is not installed: cargo install cargo-deny --locked" >&2
  exit 2
fi
checks=(licenses bans sources)
if [[ "${1:-}" == "--advisories" ]]; then
  checks+=(advisories)
fi
cargo deny check "${checks[@]}"
