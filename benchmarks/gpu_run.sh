#!/usr/bin/env bash
# One GPU lease call: install carried peer wheels, run the kernel tests, warm Triton's cache in parallel,
# sweep kernel configs and run the layer benchmark. Usage: bash benchmarks/gpu_run.sh STAGES BENCH_ARGS...
#   STAGES: comma list of  test,sweep,bench   ($OUT must be set; logs and json land there)
set -u
STAGES=$1; shift
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
if [[ ,$STAGES, == *,test,* ]]; then
  (python3 -m pytest tests/kernels -q -x -p no:cacheprovider > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.log") &
  TP=$!
fi
if [[ ,$STAGES, == *,sweep,* ]]; then
  CP=()
  for i in 0 1 2 3; do python3 benchmarks/fused_moe_sweep.py --compile-only --worker $i/4 > "/tmp/compile$i.log" 2>&1 & CP+=($!); done
  wait "${CP[@]}"
  cat /tmp/compile*.log >> "$OUT/run.log"
  log "compile warm-up done"
fi
if [ -n "${TP:-}" ]; then wait $TP; log "tests done: $(tail -1 $OUT/pytest.log)"; tail -5 "$OUT/pytest.log" | tee -a "$OUT/run.log"; fi
if [[ ,$STAGES, == *,sweep,* ]]; then
  python3 benchmarks/fused_moe_sweep.py --out "$OUT" > "$OUT/sweep.log" 2>&1
  log "sweep done"; grep -E "fwd\+bwd|ERROR" "$OUT/sweep.log" | tee -a "$OUT/run.log"
fi
if [[ ,$STAGES, == *,bench,* ]]; then
  python3 benchmarks/moe_layer.py --out "$OUT" "$@" > "$OUT/bench.log" 2>&1
  log "bench done rc=$?"; tail -25 "$OUT/bench.log"
fi
log "end"
