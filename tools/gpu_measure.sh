#!/usr/bin/env bash
# Every GPU measurement and GPU-only check the project still owes, in priority order,
# each step under its own time limit and all under one deadline, results written as
# they come (a step cut short still leaves what it printed).  NVIDIA + MLX CUDA.
#
#   bash tools/gpu_measure.sh OUTDIR [DEADLINE_SECONDS]      (run in the repository root)
#
# OUTDIR gets log.txt (everything printed) and the tools' JSON files.  Steps:
#  S. decode (issues 5, 9), first: the compiled step's GPU tests with h in bfloat16 the
#     default (stage 31; its own tests passed under memcheck, the compiled greedy-token
#     test last ran at stage 15), and the MoE layer's timeline at the defaults
#     (tools/trace_moe_layer.py: what the next change to the layer is measured against)
#  T. decode (issues 5, 9): the attention block in one launch (qkv_attention_oproj,
#     +attn1, off: 5.1 us a layer more GPU time, one node a layer less host time; faster
#     end to end on a medium host, BENCHMARKS.md 2026-12-06, sixth session; on the ninth
#     session's fast host it waited 0.22 ms a token for its GPU, the defaults 0.007) -- its GPU tests
#     at its default 16 simdgroups (they ran at 4), then end to end against the defaults,
#     7 repetitions, with the host split of each (which machines it wins on decides its
#     default); where the o_proj launch's time goes (14.1 us a layer for 4 MB, its
#     multiprocessors active about half of it: ncu's source counters and warp states of
#     that launch alone); the step's GPU time
#  P. prefill (issue 6): the whole GPU test selection of the prefill GEMMs and map0
#     (the 2026-12-06 runs passed the memcheck and the first 17 of its 51 tests before
#     their time limits), every kernel of one plain prefill with the current defaults under ncu (where
#     the time goes after the dense path and the new GEMM defaults), and end to end the
#     defaults against each of them turned off (+nodq, +map0block, +dfloat, +r64), and
#     the GEMV -> GEMM crossover again (dispatch.MV_MAX_PAIRS was set from the first GEMM
#     bodies, 0.998 ms a layer at 32 tokens; the async ones take 0.533 at 512)
#  0. the decode attention kernel's GPU test, the fused decoder layer's GPU tests, then
#     the compiled step against mlx-lm and with its measured defaults turned off: the write
#     position from the host (+hostpos), the routing in a launch of its own (+topk), the
#     router projection in a launch of its own (+notail), MLX's LM head (+mlxhead)
#  1. expert-log overhead inside one generation, the log switched on and off in ABBA blocks
#     of 8 tokens (the H100 host's speed drifts by up to 1.7x within a minute, so separate
#     generations cannot resolve 3%), uncompiled and compiled, after the record chain's GPU
#     tests (issue 3)
#  2. host cost per graph node by kind (tools/profile_decode.py --ops-only; issue 9), and
#     the dense projections as quantized_matmul vs dequantize + GEMM (mlx_moe/prefill.py)
#  3. end to end, Qwen3-30B-A3B shape: mlx-lm, our kernels, the mlx backend, the log, the
#     compiled step with and without the attention kernel, with the per-component
#     breakdown and the dense prefill path (mlx-moe+dq) (issues 5, 6, 9)
#  4. end to end, DeepSeek-V2-Lite shape (issue 9)
#  5. prefill per MoE layer, both CUDA GEMM variants vs mlx-lm (issue 6)
#  6. decode kernels' GPU time per geometry under ncu (issue 5), and the fused layer's
#     dense and attention kernels per geometry (issue 9)
#  7. the GPU tests, one file at a time, failures in full (one NVRTC compile per kernel
#     instantiation: ~10 s per test)
#  8. compute-sanitizer memcheck on the prefill kernels' GPU tests
#
# MLX compiles its own CUDA kernels on first use (NVRTC, on the calling thread): on a fresh
# machine the first bfloat16 forward took 94 s.  Its PTX cache (MLX_PTX_CACHE_DIR, default
# here OUTDIR/mlx-ptx-cache) keeps them between processes; copied to the next machine
# (a few hundred kB, compressed) it cuts that to ~10 s.
set -u
OUT=${1:?usage: tools/gpu_measure.sh OUTDIR [DEADLINE_SECONDS]}
DEADLINE=${2:-1500}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export MLX_PTX_CACHE_DIR=${MLX_PTX_CACHE_DIR:-$OUT/mlx-ptx-cache}
mkdir -p "$MLX_PTX_CACHE_DIR"
LOG="$OUT/log.txt"
T0=$(date +%s)
CUDA_BIN=${CUDA_BIN:-/usr/local/cuda/bin}

step() {  # step SECONDS COMMAND...: run unless the deadline is too close
  local limit=$1; shift
  local left=$(( DEADLINE - ($(date +%s) - T0) ))
  if [ "$left" -lt 30 ]; then echo "=== SKIPPED (deadline): $*" | tee -a "$LOG"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== [$(date -u +%FT%TZ) +$(( $(date +%s) - T0 ))s, limit ${limit}s] $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "=== exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
git log --oneline -1 2>/dev/null | tee -a "$LOG"
# S. the compiled step's GPU tests at the defaults, and the MoE layer's timeline
step 200 env MLX_ENABLE_TF32=0 python3 -m pytest -m gpu -q -rA --tb=short -p no:cacheprovider tests/test_fused_step.py \
  -k "compiled_fused_decode or router_tail"
step 120 python3 tools/trace_moe_layer.py --json "$OUT/trace.json"
# the attention block in one launch at its default geometry (chain.ATTENTION_NSG = 16)
step 200 env MLX_ENABLE_TF32=0 python3 -m pytest -m gpu -q -rA --tb=short -p no:cacheprovider tests/test_fused_step.py \
  -k "qkv_attention_oproj or attention_block or compiled_fused_decode"
step 300 python3 tools/bench_generate.py --shape qwen3-30b-a3b --experts q4_0 --kernels cuda \
  --prompt-tokens 512 --gen-tokens 128 --reps 7 --json "$OUT/e2e_attn1.json" --engines \
  mlx-lm,mlx-moe+compile,mlx-moe+compile+attn1
for e in mlx-moe+compile mlx-moe+compile+attn1; do
  step 60 python3 tools/profile_decode.py --host-split --skip-ops --kernels cuda --gen-tokens 64 --shape qwen3-30b-a3b \
    --engine "$e"
done
# the o_proj launch alone (the step's second layer's), every section and its source counters
step 150 "$CUDA_BIN/ncu" --profile-from-start off --clock-control none --set full --import-source yes --csv \
  --page details --kernel-name regex:dense_residual_parts --launch-skip 1 --launch-count 1 \
  --log-file "$OUT/ncu_full_oproj.csv" python3 tools/profile_decode.py --gpu-step --skip-ops --kernels cuda \
  --gen-tokens 32 --steps 1 --shape qwen3-30b-a3b
step 150 "$CUDA_BIN/ncu" --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
  --log-file "$OUT/ncu_step.csv" python3 tools/profile_decode.py --gpu-step --skip-ops --kernels cuda --gen-tokens 32 \
  --steps 2 --shape qwen3-30b-a3b
[ -f "$OUT/ncu_step.csv" ] && step 60 python3 tools/profile_decode.py --summarize "$OUT/ncu_step.csv" --steps 2
step 500 python3 -m pytest -m gpu -q -rA --tb=short -p no:cacheprovider tests/test_kernels_prefill_emulated.py \
  -k "map0 or gemm_variants or bf16_gemms"
# every kernel of one plain 512-token prefill (16 layers: each launches the same kernels), only
# that prefill: it runs inside the CUDA profiler range (profile_prefill --once)
step 150 "$CUDA_BIN/ncu" --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
  --log-file "$OUT/ncu_prefill.csv" python3 tools/profile_prefill.py --kernels cuda --layers 16 --tokens 512 --once
[ -f "$OUT/ncu_prefill.csv" ] && step 20 python3 tools/ncu_summary.py "$OUT/ncu_prefill.csv"
step 240 python3 tools/bench_generate.py --shape qwen3-30b-a3b --experts q4_0 --kernels cuda \
  --prompt-tokens 512 --gen-tokens 16 --reps 5 --json "$OUT/e2e_prefill.json" --engines \
  mlx-moe+compile,mlx-moe+compile+nodq,mlx-moe+compile+map0block,mlx-moe+compile+dfloat,mlx-moe+compile+r64
step 150 python3 tools/bench_kernels.py --prefill --crossover --tokens 512 --prefill-layers 4 --reps 5 \
  --float-layers 0 --json "$OUT/crossover.json"
step 120 python3 -m pytest -m gpu -q -rA --tb=short -p no:cacheprovider tests/test_attention_kernel_emulated.py
step 240 env MLX_ENABLE_TF32=0 python3 -m pytest -m gpu -q -rA --tb=short -p no:cacheprovider tests/test_fused_step.py \
  tests/test_swiglu_route.py
step 240 python3 tools/bench_generate.py --shape qwen3-30b-a3b --experts q4_0 --kernels cuda \
  --prompt-tokens 512 --gen-tokens 128 --reps 5 \
  --engines mlx-lm,mlx-moe+compile,mlx-moe+compile+hostpos,mlx-moe+compile+topk,mlx-moe+compile+notail,mlx-moe+compile+mlxhead \
  --json "$OUT/e2e_options.json"
step 120 env MLX_ENABLE_TF32=0 python3 tools/bench_generate.py --shape qwen3-30b-a3b --experts q4_0 --kernels cuda \
  --dtype float32 --prompt-tokens 32 --gen-tokens 48 --reps 1 --no-warmup --engines mlx-moe,mlx-moe+compile
step 150 python3 -m pytest -m gpu -q -rA --tb=short -p no:cacheprovider tests/test_record_chain.py \
  tests/test_routing_join.py
step 120 python3 tools/bench_log_overhead.py --shape qwen3-30b-a3b --kernels cuda --blocks 160 --block-tokens 8 \
  --json "$OUT/log_overhead.json"
step 120 python3 tools/bench_log_overhead.py --shape qwen3-30b-a3b --kernels cuda --blocks 160 --block-tokens 8 \
  --compile --json "$OUT/log_overhead_compiled.json"
step 60 python3 tools/profile_decode.py --ops-only --kernels cuda
step 90 python3 tools/bench_kernels.py --dense --tokens 16 64 128 512 2048 --reps 5 --json "$OUT/dense.json"
step 300 python3 tools/bench_generate.py --shape qwen3-30b-a3b --experts q4_0 --kernels cuda \
  --prompt-tokens 512 --gen-tokens 128 --reps 5 --engines mlx-lm,mlx-moe,mlx-moe/mlx,mlx-moe+log,mlx-moe+dq,mlx-moe+compile,mlx-moe+compile+scatter,mlx-moe+compile+topk \
  --breakdown --json "$OUT/e2e_qwen3.json"
step 200 python3 tools/bench_generate.py --shape deepseek-v2-lite --experts q4_0 --kernels cuda \
  --prompt-tokens 512 --gen-tokens 128 --reps 3 --engines mlx-lm,mlx-moe --breakdown \
  --json "$OUT/e2e_dsv2.json"
step 150 python3 tools/bench_kernels.py --prefill --tokens 512 2048 --prefill-layers 4 --reps 5 \
  --float-layers 2 --json "$OUT/prefill.json"
step 120 "$CUDA_BIN/ncu" --clock-control none --kernel-name regex:mlx_moe \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv --log-file "$OUT/ncu.csv" \
  python3 tools/bench_kernels.py --ncu --geometries "gate_up=1x4x1,1x8x1 down=4x8x1,8x8x1"
[ -f "$OUT/ncu.csv" ] && step 30 python3 tools/ncu_summary.py "$OUT/ncu.csv" --json "$OUT/ncu_summary.json"
step 120 "$CUDA_BIN/ncu" --clock-control none --kernel-name regex:mlx_moe \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv --log-file "$OUT/ncu_fused.csv" \
  python3 tools/bench_kernels.py --ncu --fused "dense=4x4,4x8,8x4,2x8 attn=8x8x8,16x8x4,4x8x16"
[ -f "$OUT/ncu_fused.csv" ] && step 30 python3 tools/ncu_summary.py "$OUT/ncu_fused.csv" --json "$OUT/ncu_fused.json"
for f in tests/test_kernels_cuda_compile.py tests/test_router_kernel_emulated.py \
         tests/test_kernels_prefill_emulated.py tests/test_kernels_cuda.py; do
  step 300 python3 -m pytest -m gpu -q -rA --tb=short -p no:cacheprovider "$f"
done
step 300 "$CUDA_BIN/compute-sanitizer" --tool memcheck --error-exitcode 9 \
  python3 -m pytest -m gpu -q -rA --tb=short -p no:cacheprovider tests/test_kernels_prefill_emulated.py \
  -k "gemm_variants or qwen3_layer_shapes"
echo "=== done in $(( $(date +%s) - T0 ))s" | tee -a "$LOG"
