#!/usr/bin/env bash
# Reproducible install into ./.venv: the matched torch/torchvision pair first, then mass-nnu (editable).
# A second run with nothing changed is a fast no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MASS_VENV:-.venv}
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
EXTRAS=${MASS_EXTRAS:-test}
stamp="$VENV/.mass-nnu-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-16) extras=$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import mass_nnu, torch" 2>/dev/null; then
  echo "setup: $VENV is up to date"
  exit 0
fi
pip_install() {  # pip's exit status survives the filter of its harmless index-location warnings (pipefail)
  "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "WARNING: Location" || true; }
}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo "setup: installing $TORCH_PINS"
pip_install $TORCH_PINS
echo "setup: installing mass-nnu[$EXTRAS]"
pip_install $TORCH_PINS -e ".[$EXTRAS]"
"$VENV/bin/python" -c "import torch, torchvision, nnunetv2, mass_nnu; print('setup: torch', torch.__version__, 'torchvision', torchvision.__version__)"
echo "$want" > "$stamp"
