#!/usr/bin/env bash
# Supply-chain checks with cargo-deny (deny.toml): licenses, banned crates, registries.
# Installs cargo-deny under target/tools when it is missing: a debug build without default
# features (no network fetchers) builds in about a minute here, where the default release build
# took 19. Advisories need the RustSec database cloned from GitHub; where it can be reached,
# pass `--advisories` to check them too (that needs a cargo-deny with its default features).
set -euo pipefail
cd "$(dirname "$0")/.."

DENY_VERSION=0.20.2
TOOLS="$PWD/target/tools"
if ! "$TOOLS/bin/cargo-deny" --version 2>/dev/null | grep -q "$DENY_VERSION"; then
  echo "deny.sh: building cargo-deny $DENY_VERSION into $TOOLS" >&2
  cargo install cargo-deny --version "$DENY_VERSION" --locked --debug --no-default-features \
    --root "$TOOLS" --quiet
fi
checks=(licenses bans sources)
if [[ "${1:-}" == "--advisories" ]]; then
  checks+=(advisories)
fi
PATH="$TOOLS/bin:$PATH" cargo deny --log-level error check "${checks[@]}"
