#!/usr/bin/env bash
# The decode MoE layer's owed GPU measurements (issue 5) in one device call, each step under
# its own limit and all under one deadline, results written as they come.  NVIDIA + MLX CUDA.
#
#   bash tools/gpu_decode_layer.sh OUTDIR [DEADLINE_SECONDS] [CANDIDATE_STAGES] [TEST_KEYWORDS]
#
# (run in the repository root with MLX CUDA importable: on the lent H100, after the staged
# install, `export PYTHONPATH=/tmp/site:$PWD` first; T0 may carry the call's start time)
# CANDIDATE_STAGES: LayerGeometry.stage values at 1x4x8x1, or whole geometry tags
# (GATExDOWNxNSGxNQxSTAGE, e.g. 2x4x4x1x14783), measured against the default
# (dispatch.MOE_LAYER["q4_0"]); default "3263" (bit 1024, the gate/up nibbles a word at a
# time, on top of the default 2239).  TEST_KEYWORDS: pytest -k keywords of
# tests/test_moe_layer_kernel.py's GPU tests to run for them (default "qwen3_shapes or
# shared_routing").  Steps, in priority order:
#   1. the layer under ncu, one process: every candidate and the default, routed and under
#      given routing (tools/bench_kernels.py --ncu --layer-geometries; ncu_summary.py
#      prints each geometry's median); FENCE_BOTH=1: then the default routed under both
#      CUDA fences in another process (--fence-both; the acq_rel launches tagged +acqrel)
#   1b. the default's routed launch under ncu's memory and warp-state sections (ncu_sections.csv),
#       and the registers the NVRTC MLX loads gives the default and the candidates
#       (tools/nvrtc_registers.py --mlx-nvrtc); skipped with SKIP_1B=1
#   2. the GPU tests TEST_KEYWORDS select
#   3. the decode step's GPU time, the default against the candidate ncu put fastest, ABAB
#      (tools/profile_decode.py --gpu-step under ncu, --summarize): a default changes only
#      on this; STEP_ENGINES (e.g. "+handoff1"): engine suffixes stepped so too, after it
#   4. the layer's timeline (tools/trace_moe_layer.py), the default and the candidates
#   5. compute-sanitizer memcheck on step 2's tests
# OUTDIR gets log.txt, the CSVs and ptx.tgz: MLX's PTX cache (MLX_PTX_CACHE_DIR), which cuts a
# fresh machine's first compile of a run from minutes to seconds when unpacked into /tmp
# before the next run (this script does so from OUTDIR/../ptx.tgz or $PTX_TGZ if present).
set -u
OUT=${1:?usage: tools/gpu_decode_layer.sh OUTDIR [DEADLINE_SECONDS] [CANDIDATE_STAGES]}
DEADLINE=${2:-540}
CANDIDATES=${3:-3263}
TESTS=${4:-qwen3_shapes or shared_routing}
mkdir -p "$OUT"
T0=${T0:-$(date +%s)}
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 MLX_PTX_CACHE_DIR=/tmp/mlx-ptx
mkdir -p "$MLX_PTX_CACHE_DIR"
PTX_TGZ=${PTX_TGZ:-}
[ -n "$PTX_TGZ" ] && [ -f "$PTX_TGZ" ] && tar xzf "$PTX_TGZ" -C /tmp 2>/dev/null
CUDA_BIN=${CUDA_BIN:-/usr/local/cuda/bin}

step() {  # step SECONDS COMMAND...: run unless the deadline is too close
  local limit=$1; shift
  local left=$(( DEADLINE - ($(date +%s) - T0) ))
  if [ "$left" -lt 20 ]; then echo "=== SKIPPED (deadline): $*" >> "$LOG"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== [$(date -u +%TZ) +$(( $(date +%s) - T0 ))s, limit ${limit}s] $*" >> "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  echo "=== exit $?" >> "$LOG"
}
saveptx() { tar czf "$OUT/ptx.tgz" -C /tmp mlx-ptx 2>/dev/null; }

# A candidate's geometry tag (a bare stage is 1x4x8x1's), and bench_generate.py's engine
# suffix for it (+moe=TAG: no list of named switches to keep in step with its SWITCHES)
tag_of() {
  case $1 in *x*) echo "$1" ;; *) echo "1x4x8x1x$1" ;; esac
}
engine_of() {
  echo "+moe=$(tag_of "$1")"
}

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader >> "$LOG" 2>&1
git log --oneline -1 >> "$LOG" 2>&1
GEOMS=$(for s in $CANDIDATES; do printf "%s," "$(tag_of "$s")"; done | sed 's/,$//')

# 1. the layer under ncu
step ${NCU_LIMIT:-230} "$CUDA_BIN/ncu" --clock-control none --kernel-name regex:mul_mv_id_moe \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv --log-file "$OUT/ncu_layer.csv" \
  python3 tools/bench_kernels.py --ncu --layer-geometries "$GEOMS"
BEST=""
if [ -f "$OUT/ncu_layer.csv" ]; then
  step 30 python3 tools/ncu_summary.py "$OUT/ncu_layer.csv"
  # the fastest routed candidate, if faster than the default
  BEST=$(python3 tools/ncu_summary.py "$OUT/ncu_layer.csv" --fastest-stage "$CANDIDATES" 2>>"$LOG")
fi
echo "=== fastest candidate under ncu: ${BEST:-none}" >> "$LOG"
saveptx
# (FENCE_BOTH=1) the default routed under both CUDA fences, one process (tagged +acqrel)
if [ -n "${FENCE_BOTH:-}" ]; then
  step 120 "$CUDA_BIN/ncu" --clock-control none --kernel-name regex:mul_mv_id_moe \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv --log-file "$OUT/ncu_fence.csv" \
    python3 tools/bench_kernels.py --ncu --layer-geometries "" --fence-both
  [ -f "$OUT/ncu_fence.csv" ] && step 30 python3 tools/ncu_summary.py "$OUT/ncu_fence.csv"
fi

# 1b. where the default's routed launch waits: one launch under ncu's memory and warp-state
# sections (L1 / L2 hit rates and the L2 traffic of h, the stall reasons), the details page
[ -z "${SKIP_1B:-}" ] && step 90 "$CUDA_BIN/ncu" --clock-control none --kernel-name regex:mul_mv_id_moe_bfloat --launch-skip 1 --launch-count 1 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
  --section WarpStateStats --section SchedulerStats --csv --page details --log-file "$OUT/ncu_sections.csv" \
  python3 tools/bench_kernels.py --ncu --layer-geometries ""
[ -z "${SKIP_1B:-}" ] && step 60 python3 tools/nvrtc_registers.py --mlx-nvrtc --stages "$(python3 -c 'from mlx_moe.kernels import dispatch; print(dispatch.MOE_LAYER["q4_0"].stage)')$(for s in $CANDIDATES; do case $s in *x*) ;; *) printf ",%s" "$s" ;; esac; done)"

# 2. the candidates' GPU tests
step 150 python3 -m pytest -m gpu -q -rA --tb=short -p no:cacheprovider tests/test_moe_layer_kernel.py \
  -k "cuda and ($TESTS)"
saveptx

# 3. the decode step, default against the fastest candidate, ABAB
ENG0=$( [ -n "$BEST" ] && engine_of "$BEST" )
for ENG in $ENG0 ${STEP_ENGINES:-}; do
  for rep in 1 2; do
    for e in mlx-moe+compile "mlx-moe+compile$ENG"; do
      f="$OUT/step_vs$(echo "$ENG" | tr '+=' '__')_$(echo "$e" | tr '+=' '__')_$rep.csv"  # (each pair's own files)
      step 100 "$CUDA_BIN/ncu" --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
        --log-file "$f" python3 tools/profile_decode.py --gpu-step --skip-ops --kernels cuda --gen-tokens 32 \
        --steps 2 --shape qwen3-30b-a3b --engine "$e"
      [ -f "$f" ] && step 30 python3 tools/profile_decode.py --summarize "$f" --steps 2
      saveptx
    done
  done
done

# 4. the timeline
DEFAULT_STAGE=$(python3 -c 'from mlx_moe.kernels import dispatch; print(dispatch.MOE_LAYER["q4_0"].stage)')
step 120 python3 tools/trace_moe_layer.py --geometries "1x4x8x1x$DEFAULT_STAGE,$GEOMS" --json "$OUT/trace.json"

# 5. memcheck
step 200 "$CUDA_BIN/compute-sanitizer" --tool memcheck --error-exitcode 9 python3 -m pytest -m gpu -q -rA --tb=short \
  -p no:cacheprovider tests/test_moe_layer_kernel.py -k "cuda and ($TESTS)"
echo "=== done in $(( $(date +%s) - T0 ))s" >> "$LOG"
