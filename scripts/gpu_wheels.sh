#!/usr/bin/env bash
# The wheels a bare GPU machine (PyTorch + transformers only, no registry) needs for
# `bash bench/gpu_check.sh`: megatron-core / megatron-bridge and the small pure-Python packages
# they import that such a machine lacks, at the versions of requirements.lock. Run where PyPI is
# reachable; the machine gets them with the checkout (docs/gpu.md). Fails if the bundle, plus the
# tokenizer cache it travels with, exceeds the 64 MiB a device session may bring.
#   bash scripts/gpu_wheels.sh            # download into .cache/gpu-wheels (ignored by git)
#   bash scripts/gpu_wheels.sh --check    # only check the size of what is there
# Environment: PYTHON (default .venv/bin/python), GPU_WHEELS_DIR, GPU_PYTHON_VERSION (default 3.12).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DIR=${GPU_WHEELS_DIR:-.cache/gpu-wheels}
PYVER=${GPU_PYTHON_VERSION:-3.12}
BUDGET_MIB=64
TRAVELS_WITH=(.cache/tokenizer-llama3)  # carried too: the Llama-3 tokenizer the check's model uses
# What speechlm's training, checkpoint, conversion and synthesis modules import beyond torch and
# transformers (found by importing them with only these on the path). HF datasets, megatron-energon,
# PIL and nvidia-modelopt (~120 MB with pyarrow, scipy, PuLP) get stand-ins instead, for code paths
# we never take: speechlm.train.cpu_compat._apply_no_te.
PACKAGES=(megatron-core megatron-bridge omegaconf einops tensorboard protobuf absl-py)
SDIST_ONLY=(antlr4-python3-runtime)  # no wheel on PyPI: built here (pure Python)

die() { echo "gpu_wheels: ERROR: $*" >&2; exit 1; }
case "${1:-}" in
    "" ) mode=download ;;
    --check ) mode=check ;;
    -h|--help ) sed -n 2,9p "$0"; exit 0 ;;
    * ) die "unknown argument '$1' (use --check or nothing)" ;;
esac

pin() {  # package -> package==version from requirements.lock
    local v
    v=$(grep -i "^${1//-/[-_]}==" requirements.lock | head -1 | cut -d= -f3)
    [[ $1 != megatron-bridge ]] || v=$(grep -o '^BRIDGE_VERSION=.*' scripts/setup.sh | cut -d= -f2)  # installed --no-deps there
    [[ -n $v ]] || die "$1 is not in requirements.lock"
    echo "$1==$v"
}

if [[ $mode == download ]]; then
    [[ -x $PYTHON ]] || die "$PYTHON not found: run bash scripts/setup.sh first (or set PYTHON)"
    mkdir -p "$DIR"
    pins=(); for p in "${PACKAGES[@]}"; do pins+=("$(pin "$p")"); done
    pip=("$PYTHON" -m pip --disable-pip-version-check)
    "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --abi "cp${PYVER/./}" --abi abi3 --abi none --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
        -d "$DIR" "${pins[@]}" || die "pip download failed (output above). Is PyPI reachable?"
    for p in "${SDIST_ONLY[@]}"; do
        "${pip[@]}" wheel -q --no-deps -w "$DIR" "$(pin "$p")" || die "building the $p wheel failed"
    done
fi

compgen -G "$DIR/*.whl" >/dev/null || die "no wheels in $DIR: run bash scripts/gpu_wheels.sh"
total=$(du -scb "$DIR" "${TRAVELS_WITH[@]}" 2>/dev/null | tail -1 | cut -f1)
mib=$(( (total + 1048575) / 1048576 ))
echo "gpu_wheels: $DIR holds $(find "$DIR" -maxdepth 1 -name "*.whl" | wc -l) wheels; with ${TRAVELS_WITH[*]}: $mib MiB of $BUDGET_MIB"
(( total <= BUDGET_MIB * 1048576 )) || die "$mib MiB is over the $BUDGET_MIB MiB a device session may bring"
