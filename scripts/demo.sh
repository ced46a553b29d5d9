#!/usr/bin/env bash
# The whole MASS pipeline on the embedded MNI demo data (installs .venv if needed). Extra arguments go to `mass demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mass demo "$@"
