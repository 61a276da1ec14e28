# The RunPod serverless worker image (CUDA). Build and push (see README, "The whole loop"):
#   docker build -t <registry>/lora-worker:<tag> . && docker push <registry>/lora-worker:<tag>
# The local venv (make demo / make test) uses a CPU build of the same torch instead: see the Makefile.
#
# BASE_IMAGE: a plain Python 3.11 by default. A base that already has torch with flash-attn and
# causal-conv1d built for it (e.g. a RunPod PyTorch image) works too: pass it with TORCH_SPEC="" so
# its torch stays, and the worker uses those kernels when they import (training/kernels.py).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# DL3064: TOKENIZERS_PARALLELISM names no secret.
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false \
    RUNPOD_LOG_LEVEL=INFO \
    MPLCONFIGDIR=/tmp/matplotlib

# Triton (liger-kernel, flash-linear-attention, torch.compile) compiles a small C launcher the first
# time a kernel runs: it needs a C compiler in the image, or those kernels fail at the first step.
# DL3008: the base's own Debian release pins these; exact versions vanish from its mirror.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# torch first and on its own: PyPI's Linux x86_64 wheel of torch 2.13.0 is the CUDA build and
# carries its CUDA 13 runtime; RunPod hosts provide the driver (580 or newer). Another CUDA line:
#   --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
ARG TORCH_SPEC="torch==2.13.0"
# DL3013: the pin is in TORCH_SPEC.
# hadolint ignore=DL3013
RUN if [ -n "${TORCH_SPEC}" ]; then pip install --no-cache-dir ${TORCH_SPEC}; fi

# The runtime pins, then the GPU extras that install from PyPI without a compiler (bitsandbytes,
# liger-kernel, flash-linear-attention); `pip check` fails the build on a conflict.
COPY requirements.txt requirements-gpu.txt ./
RUN pip install --no-cache-dir -r requirements.txt -r requirements-gpu.txt && pip check

# The worker's code only: no tests, no test_input.json (the runpod SDK would run it and exit), no
# secrets and no model weights (those are the endpoint's settings and the network volume's).
COPY *.py ./
COPY config/ config/
COPY models/ models/
COPY data/ data/
COPY training/ training/
COPY adapters/ adapters/
COPY storage/ storage/
COPY demo/ demo/

CMD ["python", "-u", "handler.py"]
