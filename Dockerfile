# The RunPod serverless worker image (CUDA). Build and push:
#   docker build -t <registry>/lora-worker:<tag> .
# The local venv (make demo / make test) uses a CPU build of the same torch instead: see the Makefile.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false \
    RUNPOD_LOG_LEVEL=INFO \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /app

# torch first and on its own: PyPI's Linux x86_64 wheel of torch 2.13.0 is the CUDA build and
# carries its CUDA runtime; RunPod hosts provide the driver. Override for another CUDA line, e.g.
#   --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install --upgrade pip && pip install ${TORCH_SPEC}

COPY requirements.txt requirements-gpu.txt ./
RUN pip install -r requirements.txt -r requirements-gpu.txt

# The worker's code only: no tests, no test_input.json (the runpod SDK would run it and exit).
COPY *.py ./
COPY config/ config/
COPY models/ models/
COPY data/ data/
COPY training/ training/
COPY adapters/ adapters/
COPY storage/ storage/
COPY demo/ demo/

CMD ["python", "-u", "handler.py"]
