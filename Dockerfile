# The image for the docker and kubernetes GPU pools (deployments/work-pools/*-t4.json).
#   docker build -t finance-qlora:latest .
# CUDA 12.4 runtime: T4 (sm_75) and newer; bitsandbytes ships its CUDA kernels in the wheel.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# /cache: mount a volume there to keep, from one flow run's container to the next, the hub's
# downloads, the kept 4-bit copies of checkpoints (FINANCE_QLORA_CACHE: the first load
# quantizes), Triton's compiled kernels (the decode steps' attention, the compiled layers') and
# inductor's compiled graphs of the layers (without them each run compiles the layers cold:
# 13-18 s against about 2 s on an H200, benchmarks/README.md)
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface FINANCE_QLORA_CACHE=/cache/finance-qlora \
    TRITON_CACHE_DIR=/cache/triton TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
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
