#!/usr/bin/env bash
# The GPU paths end to end on one GPU, in about 10 minutes, with every ratio on one screen at the end:
#   1. bare forward (images/s) of ERFNet, EoMT-L and Mask2Former Swin-L-sized configs (random weights), fp32 and bf16;
#   2. the benchmark's Ray Data pass vs the bare forward (ERFNet at 512x1024; target: pass >= 0.9 of in-process),
#      in bf16 also with one call per actor at a time (pipeline-bf16-serial: what the default two overlap gains);
#   3. a DeepSpeed (ZeRO-1) training step vs DDP on Ray Train, one GPU worker;
#   4. the S2M refine stage with a SAM-B-sized random SAM (1024 input, 768 hidden, 12 layers) vs the score stage.
#
#   bash benchmarks/gpu.sh                 # on a GPU machine (logs: $OUT or ./results/gpu-bench)
#   SMALL=1 bash benchmarks/gpu.sh         # the same steps at CPU sizes: checks the script itself anywhere
#
# Each step has its own time limit (STEP_S, default 240 s) so one slow step cannot eat the others; a failed step is
# reported as such and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LOG=${OUT:-results/gpu-bench}
STEP_S=${STEP_S:-240}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 RAY_ACCEPT_CLUSTER_AUTH_TOKEN=1

if [ "${SMALL:-0}" = 1 ]; then
  MODELS=(--small --iters 2 --warmup 1); PIPE=(--image-size 128 256 --images 4 --batch-size 4)
  TRAIN=(--workers 1 --steps 6 --warmup-steps 2); REFINE=(--images 4)
  PRECISIONS=(fp32)
else
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
    || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  MODELS=(--iters 10 --warmup 3 --batch-size 2 --device cuda)
  PIPE=(--image-size 512 1024 --images 32 --batch-size 8 --num-cpus 0 --device cuda)
  TRAIN=(--use-gpu --workers 1 --width 1.0 --steps 40 --warmup-steps 10)
  REFINE=(--image-size 512 1024 --images 16 --num-cpus 0 --sam-size 1024 --sam-hidden 768 --sam-layers 12
          --sam-heads 12)
  PRECISIONS=(fp32 bf16)
fi

step() {  # step NAME ARGS...: run one benchmark script with its limit, keep its log
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "$STEP_S" "$PY" "$@" >"$LOG/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s" >>"$LOG/steps.txt"
  [ $rc = 0 ] || echo "   FAILED (exit $rc): see $LOG/$name.log"
}

: >"$LOG/steps.txt"
for p in "${PRECISIONS[@]}"; do
  step "models-$p" benchmarks/models.py --models erfnet,eomt,mask2former --precision "$p" "${MODELS[@]}"
  step "pipeline-$p" benchmarks/pipeline.py --precision "$p" "${PIPE[@]}"
done
[ "${SMALL:-0}" = 1 ] || step pipeline-bf16-serial benchmarks/pipeline.py --precision bf16 --actor-concurrency 1 "${PIPE[@]}"
step train benchmarks/train.py "${TRAIN[@]}"
step refine benchmarks/refine.py "${REFINE[@]}"

echo
echo "================ summary ($LOG) ================"
cat "$LOG/steps.txt"
for f in "$LOG"/models-*.log "$LOG"/pipeline-*.log "$LOG"/train.log "$LOG"/refine.log; do
  [ -f "$f" ] || continue
  echo "--- $(basename "$f" .log)"
  grep -E "images/s|img/s|steps/s|ratio|×|target|^(erfnet|eomt|mask2former) " "$f" | tail -12
done
