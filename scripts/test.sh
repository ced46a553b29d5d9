#!/usr/bin/env bash
# Run the test suite in ./.venv (made by scripts/setup.sh if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export nnUNet_n_proc_DA=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MPLBACKEND=Agg
exec .venv/bin/python -m pytest -q --durations=15 "$@"
