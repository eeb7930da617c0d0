#!/usr/bin/env bash
# Re-resolve requirements.lock from requirements*.in in a scratch venv (run after changing a pin).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3.12}" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q -r requirements.in -r requirements-dev.in
{
    echo "# Generated from requirements.in + requirements-dev.in with 'pip freeze' (see scripts/lock.sh)."
    echo "# megatron-bridge is installed separately with --no-deps (scripts/setup.sh)."
    "$tmp/venv/bin/pip" freeze
} > requirements.lock
