#!/usr/bin/env bash
# Wheels for a GPU machine that has Python 3.12 with PyTorch but no package index (this workplace's H200): the
# packages mass-nnu needs beyond that image, into .whl/ (git-ignored through .git/info/exclude), 47 MB in all.
# SimpleITK's 53 MB wheel travels as an xz tar of its unpacked files (28 MB). On the GPU machine, from the repository
# root:  bash .whl/device_setup.sh && export PYTHONPATH=/tmp/site:$PWD   (then PYTHON=python3 bash benchmarks/gpu_check.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
PLATFORMS=(manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64)
download() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]/#/--platform=}" -d .whl "$@" 2>&1 | { grep -v "WARNING: Location" || true; }; }
# versions as resolved in .venv by scripts/setup.sh on 2026-12-04 (the image lacks these; it has torch, numpy,
# scipy, scikit-image, scikit-learn, matplotlib, pandas, typer, timm, tqdm, httpx, rich, msgpack)
download nnunetv2==2.8.1 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 blosc2==4.15.0 \
  connected-components-3d==4.1.1 dynamic_network_architectures==0.4.4 graphviz==0.21 ndindex==1.10.1 nibabel==5.4.2 \
  yacs==0.1.8 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.16.0
python3 -m pip wheel -q --no-deps -w .whl acvl_utils==0.2.6 2>&1 | { grep -v "WARNING: Location" || true; }  # sdist only
if [[ ! -f .whl/sitk.tar.xz ]]; then
  download simpleitk==2.5.7
  tmp=$(mktemp -d); unzip -q .whl/simpleitk-*.whl -d "$tmp"; rm .whl/simpleitk-*.whl
  tar -C "$tmp" -cf - . | xz -9 -T0 > .whl/sitk.tar.xz; rm -rf "$tmp"
fi
cat > .whl/device_setup.sh <<'SETUP'
#!/usr/bin/env bash
# On the GPU machine: the carried wheels into /tmp/site (then export PYTHONPATH=/tmp/site:$PWD).
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
tar -xJf .whl/sitk.tar.xz -C /tmp/site
PYTHONPATH=/tmp/site:$PWD python3 -c "import torch, nnunetv2, SimpleITK, blosc2, mass_nnu; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
SETUP
du -sh .whl
