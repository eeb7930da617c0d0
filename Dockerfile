# The training image: NVIDIA's NeMo Framework container plus this project.
#
# Base: NeMo Framework 26.08, the release that carries the Megatron-Bridge 0.6 line
# (Megatron-Bridge's 0.6.0 release notes are titled "NeMo Framework 26.08") with its matching
# megatron-core, TransformerEngine, CUDA, NCCL and PyTorch builds. Pin the tag you validated;
# prefer the latest 26.08 patch tag (e.g. 26.08.01) if NVIDIA publishes one.
#
#   docker build -t speechlm:latest .
#   enroot import -o speechlm.sqsh dockerd://speechlm:latest   # for pyxis on SLURM
ARG NEMO_IMAGE=nvcr.io/nvidia/nemo:26.08
FROM ${NEMO_IMAGE}

# Our pins (the same as requirements.lock and speechlm/train/cpu_compat.py; tests check they agree).
ARG MEGATRON_BRIDGE_VERSION=0.6.2
ARG MEGATRON_CORE_VERSION=0.19.2

WORKDIR /opt/speechlm
COPY docker/check_container.py docker/
# 1. Bring megatron-bridge / megatron-core to our patch release if the tag carries another one
#    of the same line. --no-deps: never touch the container's torch/CUDA/TE stack.
RUN python docker/check_container.py --sync --bridge "${MEGATRON_BRIDGE_VERSION}" --core "${MEGATRON_CORE_VERSION}"

# 2. What this project needs beyond the container (data preparation; tiktoken: the text
#    tokenizer's fast path; numba: SFT packing's compiled first-fit; orjson: shard metadata):
#    each package the image lacks, at our pin, constrained to every version the image already
#    has, so pip fails the build rather than replace anything NVIDIA ships.
COPY requirements.in ./
RUN python docker/check_container.py --extras requirements.in \
        webdataset boto3 datasets pyarrow matplotlib omegaconf tiktoken numba orjson

# 3. The project itself (code only; no dependencies).
COPY pyproject.toml ./
COPY speechlm ./speechlm
COPY conversion ./conversion
COPY data_prep ./data_prep
COPY recipes ./recipes
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e .

# 4. Fail the build on a version mismatch or a failed import (TransformerEngine included).
RUN python docker/check_container.py --bridge "${MEGATRON_BRIDGE_VERSION}" --core "${MEGATRON_CORE_VERSION}"

ENV PYTHONUNBUFFERED=1
