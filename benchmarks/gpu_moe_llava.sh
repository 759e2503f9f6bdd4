#!/usr/bin/env bash
# The MoE-LLaVA-style results in one GPU lease call: MoE-Tuning stages I, II, III and the dense control (stage II
# trained on for stage III's steps, side by side with stage III), then the stage-III step benchmark.
# Usage: bash benchmarks/gpu_moe_llava.sh STAGES   STAGES: comma list of stage1,stage2,stage3,more,bench
# (BENCH_TIMEOUT=seconds caps the benchmark so a lease call still returns the training results; BENCH_ARGS)
# Needs what benchmarks/gpu_recipes.sh needs.
set -u
STAGES=$1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/logs
has() { [[ ,$STAGES, == *,$1,* ]]; }
PLAN=""
has stage1 && PLAN+="moe_llava_stage1;"
has stage2 && PLAN+="moe_llava_stage2;"
LAST=""
has stage3 && LAST+="moe_llava_stage3,"
has more && LAST+="moe_llava_stage2_more,"
PLAN+="${LAST%,}"
[ -n "${PLAN%;}" ] && bash benchmarks/gpu_recipes.sh "${PLAN%;}"
if has bench; then
  PYTHONPATH=/tmp/site:$PWD timeout "${BENCH_TIMEOUT:-600}" python3 benchmarks/moe_llava_step.py --out "$OUT" \
    ${BENCH_ARGS:-} > /tmp/logs/bench.log 2>&1
  echo "bench rc=$?" >> "$OUT/run.log"; tail -40 /tmp/logs/bench.log >> "$OUT/run.log"
fi
