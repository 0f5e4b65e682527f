#!/usr/bin/env bash
# Install ocp_deq and its stack in the current Python environment.
#   bash install.sh          # runtime
#   bash install.sh --test   # runtime + pytest
# Order matters: torch first (an existing install, e.g. a CUDA build, is kept; otherwise
# torch 2.13.0, the CPU build on CPU-only machines), then ocp_deq and its requirements,
# then fairchem-core 1.10.0 with --no-deps (its torch~=2.4.0 pin would pull a CUDA build).
# torch_scatter / torch_sparse: if absent, ocp_deq uses its own pure-torch stand-ins.
# Set OCP_DEQ_COMPILED=1 to compile the real ones instead (~10 min each).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pip_install() { PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
    pip_install "torch==${OCP_DEQ_TORCH_VERSION:-2.13.0}"
fi
extras=""
if [[ "${1:-}" == "--test" ]]; then extras="[test]"; fi
pip_install -e ".${extras}"
pip_install --no-deps "fairchem-core==1.10.0"
if [[ "${OCP_DEQ_COMPILED:-0}" == "1" ]]; then
    pip_install --no-build-isolation torch-scatter torch-sparse
fi
"$PY" -c "import ocp_deq, torch, fairchem.core; print('ocp_deq ready: torch', torch.__version__, '| fairchem-core', fairchem.core.__version__)"
