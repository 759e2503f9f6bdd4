#!/usr/bin/env bash
# One GPU lease call: install carried peer wheels, run the kernel tests (warming Triton's cache in parallel),
# sweep kernel configs, run the layer benchmark and the SonicMoE peer (its CuTe JIT is slow: own time limit).
# Usage: bash benchmarks/gpu_run.sh STAGES   with STAGES a comma list of trainstep,test,sweep,bench,sonic
# (trainstep runs first, alone on the GPU, before the tests start)
# Env: STEP_ARGS, BENCH_ARGS, SWEEP_ARGS, SONIC_CASE, SONIC_TIMEOUT.  $OUT must be set; logs and json land there.
set -u
STAGES=$1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/run.log"; }
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; } >> "$OUT/run.log" 2>&1
if [ -d .whl ]; then
  mkdir -p /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> "$OUT/run.log" 2>&1 || log "pip install of wheels failed"
  if [ -f .whl/cutl.tar.xz ]; then tar xJf .whl/cutl.tar.xz -C /tmp/site >> "$OUT/run.log" 2>&1 || log "cutlass unpack failed"; fi
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/python_packages
  log "wheels installed"
fi
if [[ ,$STAGES, == *,trainstep,* ]]; then
  python3 benchmarks/train_step.py --out "$OUT" --profile ${STEP_ARGS:-} > "$OUT/train_step.log" 2>&1
  log "train_step done rc=$?"; grep -E "Target|^\| " "$OUT/train_step.md" | head -8 | tee -a "$OUT/run.log"
fi
if [[ ,$STAGES, == *,test,* ]]; then
  (python3 -m pytest tests/kernels -q -x -n 4 -p no:cacheprovider > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.log") &
  TP=$!
fi
if [[ ,$STAGES, == *,sweep,* ]]; then
  CP=()
  for i in 0 1 2 3; do python3 benchmarks/fused_moe_sweep.py --compile-only --worker $i/4 ${SWEEP_ARGS:-} > "/tmp/compile$i.log" 2>&1 & CP+=($!); done
  wait "${CP[@]}"
  cat /tmp/compile*.log >> "$OUT/run.log"
  log "compile warm-up done"
fi
if [ -n "${TP:-}" ]; then wait $TP; log "tests done: $(tail -1 $OUT/pytest.log)"; tail -4 "$OUT/pytest.log" | tee -a "$OUT/run.log"; fi
if [[ ,$STAGES, == *,sweep,* ]]; then
  python3 benchmarks/fused_moe_sweep.py --out "$OUT" ${SWEEP_ARGS:-} > "$OUT/sweep.log" 2>&1
  log "sweep done"; grep -E "fwd\+bwd|ERROR" "$OUT/sweep.log" | tee -a "$OUT/run.log"
fi
if [[ ,$STAGES, == *,bench,* ]]; then
  python3 benchmarks/moe_layer.py --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  log "bench done rc=$?"
fi
if [[ ,$STAGES, == *,moeops,* ]]; then
  # moe-ops' backward crashed the CUDA context (illegal memory access) in an earlier run: own process, forward only
  RES=""; [ -f "$OUT/moe_layer.json" ] && RES="--resume $OUT/moe_layer.json"
  timeout ${MOEOPS_TIMEOUT:-90} python3 benchmarks/moe_layer.py --out "$OUT" --impls moeops --fwd-only moeops \
    --fwd-only-reason "its backward hit an illegal memory access (trans_b=True) or an assertion (trans_b=False) on H100" \
    --only "${MOEOPS_CASES:-V-MoE-B/16 E8 k2 cf1.05 uniform T12608,mixtral E8 k2 dropless uniform T8192,olmoe E64 k8 dropless uniform T16384}" \
    $RES >> "$OUT/bench.log" 2>&1
  log "moe-ops done rc=$?"
fi
if [[ ,$STAGES, == *,sonic,* ]]; then
  RES=""; [ -f "$OUT/moe_layer.json" ] && RES="--resume $OUT/moe_layer.json"
  timeout ${SONIC_TIMEOUT:-150} python3 benchmarks/moe_layer.py --out "$OUT" --impls sonic --only "${SONIC_CASE:-olmoe E64 k8 dropless uniform T16384}" $RES >> "$OUT/bench.log" 2>&1
  log "sonic done rc=$?"
fi
grep -E "^==|^- " "$OUT/bench.log" | tail -40
log "end"
