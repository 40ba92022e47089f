# The image for the docker and kubernetes GPU pools (deployments/work-pools/*-t4.json).
#   docker build -t finance-qlora:latest .
# CUDA 12.4 runtime: T4 (sm_75) and newer; bitsandbytes ships its CUDA kernels in the wheel.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# /cache: mount a volume there to keep downloads and compiled kernels (Triton's: the decode
# steps' attention, the compiled layers) from one flow run to the next
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface TRITON_CACHE_DIR=/cache/triton \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev gcc git \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/finance-qlora
# torch first, in its own layer: code changes do not download it again.
RUN pip install --upgrade pip \
    && pip install torch==2.6.0 --index-url https://download.pytorch.org/whl/cu124
COPY pyproject.toml README.md prefect.yaml ./
COPY finance_qlora ./finance_qlora
COPY flows ./flows
COPY tasks ./tasks
# gpu: Liger's fused kernels (train.fused_kernels, opt-in). Triton's kernels (compiled layers,
# on in llama2-7b-h100, and Liger's) need gcc and Python's headers: installed above.
RUN pip install -e ".[s3,gpu]"
