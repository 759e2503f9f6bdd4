#!/usr/bin/env bash
# One GPU lease call for the MoE-LLaVA-style results: MoE-Tuning stages I, II, III and the dense control (stage II
# trained on for stage III's steps) with train.py on the carried real data, then the stage-III step benchmark.
# Usage: bash benchmarks/gpu_moe_llava.sh STAGES   STAGES: comma list of stage1,stage2,stage3,more,bench
# (BENCH_TIMEOUT=seconds caps the benchmark so a lease call still returns the training results)
# Needs: $OUT (results), .carry/whl (jsonargparse & co., open_clip + ftfy + wcwidth), .carry/data (mnist,
# flickr8k_1k_subset). Runs land in runs/ (kept between calls on a warm machine); summaries and plots go to $OUT.
set -u
STAGES=$1
export PYTHONUNBUFFERED=1 ZOO_DATA=$PWD/.carry/data
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/logs
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/run.log"; }
if [ -d .carry/whl ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/*.whl \
    >> "$OUT/run.log" 2>&1 || log "pip install of wheels failed"
fi
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> "$OUT/run.log" 2>&1
stage() {  # stage NAME CONFIG [extra train.py args]
  local name=$1 cfg=$2; shift 2
  local t=$(date +%s)
  python3 train.py --config "$cfg" --overwrite true --data.init_args.num_workers=8 --trainer.enable_progress_bar=false "$@" \
    > "/tmp/logs/$name.log" 2>&1
  local rc=$?
  log "$name rc=$rc in $(( $(date +%s) - t ))s"
  echo "{\"stage\": \"$name\", \"summary\": $(tail -1 /tmp/logs/$name.log | grep '^{' || echo null)}" >> "$OUT/summaries.jsonl"
  grep -E "trainable / frozen|^(group|total|vision|projector|routers|experts|dense|attention|norms|embed|lm_head)" \
    "/tmp/logs/$name.log" | head -14 >> "$OUT/run.log"
  [ $rc -eq 0 ] || tail -30 "/tmp/logs/$name.log" >> "$OUT/run.log"
}
[[ ,$STAGES, == *,stage1,* ]] && stage stage1 configs/train/moe_llava_stage1.yaml
[[ ,$STAGES, == *,stage2,* ]] && stage stage2 configs/train/moe_llava_stage2.yaml
# stage III and its dense control both start from stage II and share nothing else: on one GPU they run side by side
# (the tiny models leave it mostly idle), which halves the wall time of the pair.
[[ ,$STAGES, == *,stage3,* ]] && stage stage3 configs/train/moe_llava_stage3.yaml &
[[ ,$STAGES, == *,more,* ]] && stage stage2_more configs/train/moe_llava_stage2_more.yaml &
wait
if [[ ,$STAGES, == *,bench,* ]]; then
  timeout "${BENCH_TIMEOUT:-600}" python3 benchmarks/moe_llava_step.py --out "$OUT" ${BENCH_ARGS:-} > /tmp/logs/bench.log 2>&1
  log "bench rc=$?"; tail -40 /tmp/logs/bench.log >> "$OUT/run.log"
fi
for r in runs/moe_llava_stage3/plots/routing_test_by_modality.png runs/moe_llava_stage3/plots/routing_test_expert_mix.png; do
  [ -f "$r" ] && cp "$r" "$OUT/stage3_$(basename $r)"
done
log "done"
