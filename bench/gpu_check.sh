#!/usr/bin/env bash
# The GPU acceptance check (docs/gpu.md): every GPU-only path this machine has packages for,
# figures into docs/gpu.md (or --out FILE), what could not run said plainly.
#   bash bench/gpu_check.sh                     # NeMo container / a cluster node: everything it finds
#   bash bench/gpu_check.sh --out "$OUT/gpu.md" # e.g. a GPU session that returns files under $OUT
#   bash bench/gpu_check.sh --dry-run           # any machine: what would run here, and why not
# On a bare GPU machine (PyTorch + transformers only) it first unpacks the wheels that
# scripts/gpu_wheels.sh put in .cache/gpu-wheels (or $SPEECHLM_GPU_WHEELS) into a temp dir on
# PYTHONPATH: no pip, no registry. Every other option: python bench/gpu_check.py --help.
# Environment: PYTHON (default .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || { echo "gpu_check: ERROR: $PYTHON not found (set PYTHON)" >&2; exit 2; }
WHEELS=${SPEECHLM_GPU_WHEELS:-.cache/gpu-wheels}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # speechlm without installing it

dry_run=0
for arg in "$@"; do [[ $arg == --dry-run ]] && dry_run=1; done

have_megatron='import importlib.util as u, sys; sys.exit(not (u.find_spec("megatron.core") and u.find_spec("megatron.bridge")))'
if ! "$PYTHON" -c "$have_megatron" >/dev/null 2>&1; then
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        site=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")
        # A wheel is a zip laid out as site-packages: unpacking it is installing it, pip or not.
        "$PYTHON" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
            "$site" "$WHEELS"/*.whl
        export PYTHONPATH="$site:$PYTHONPATH"
        echo "gpu_check: megatron-core/bridge not installed: using the $(find "$WHEELS" -maxdepth 1 -name "*.whl" | wc -l) wheels of $WHEELS ($site)"
    elif (( ! dry_run )); then
        echo "gpu_check: ERROR: megatron-core / megatron-bridge are not installed and $WHEELS holds no wheels:" \
             "run 'bash scripts/gpu_wheels.sh' where PyPI is reachable and bring $WHEELS along" >&2
        exit 2
    fi
fi
exec "$PYTHON" bench/gpu_check.py "$@"
