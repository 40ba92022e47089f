#!/usr/bin/env bash
# Create (or update) the work pools that prefect.yaml deploys to, from the templates here.
#
#   bash deployments/create-pools.sh [kubernetes|docker|process|vertex-ai]   (default: process)
#
# gpu-t4:      the GPU pool, from deployments/work-pools/<type>-t4.json (process: process-gpu.json),
#              with a concurrency limit of 1: one GPU, one training at a time.
# cpu-process: a plain process pool for the smoke-cpu deployment.
set -euo pipefail
prefect() { ${PREFECT:-command prefect} "$@"; }  # PREFECT="python -m prefect" without a venv
here="$(cd "$(dirname "$0")" && pwd)"
type="${1:-process}"
case "$type" in
  kubernetes|docker|vertex-ai) template="$here/work-pools/$type-t4.json" ;;
  process) template="$here/work-pools/process-gpu.json" ;;
  *) echo "error: unknown pool type '$type'; use kubernetes, docker, process or vertex-ai" >&2; exit 2 ;;
esac

prefect work-pool create gpu-t4 --type "$type" --base-job-template "$template" --overwrite
prefect work-pool set-concurrency-limit gpu-t4 1
prefect work-pool create cpu-process --type process --overwrite
