#!/usr/bin/env bash
# One GPU lease call that trains train.py recipes on the carried real data, in an order with side-by-side groups.
# Usage: bash benchmarks/gpu_recipes.sh PLAN
#   PLAN: groups separated by ';' run one after another; the recipes of a group (configs/train/NAME.yaml, names
#   separated by ',') run side by side: the tiny models leave an H200 mostly idle, so independent runs (stage III and
#   its dense control, the four Uni-MoE stage-2 modality runs) share it and halve the wall time.
#   e.g. "moe_llava_stage1;moe_llava_stage2;moe_llava_stage3,moe_llava_stage2_more"
# Env: WORKERS (loader workers per run, default 8), EXTRA (more train.py arguments for every run).
# Needs: $OUT (results), .carry/whl (jsonargparse & co.; open_clip + ftfy + wcwidth), .carry/data (the datasets the
# recipes read). Runs land in runs/ (kept between calls on a warm machine); each run's summary line goes to
# $OUT/summaries.jsonl, its trainable table and failures to $OUT/run.log, its plots to $OUT/<run>/.
set -u
PLAN=$1
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
recipe() {  # recipe NAME
  local name=$1 t=$(date +%s)
  python3 train.py --config "configs/train/$name.yaml" --overwrite true --data.init_args.num_workers="${WORKERS:-8}" \
    --trainer.enable_progress_bar=false ${EXTRA:-} > "/tmp/logs/$name.log" 2>&1
  local rc=$?
  log "$name rc=$rc in $(( $(date +%s) - t ))s"
  echo "{\"stage\": \"$name\", \"summary\": $(tail -1 /tmp/logs/$name.log | grep '^{' || echo null)}" >> "$OUT/summaries.jsonl"
  { echo "== $name"; sed -n '/trainable \/ frozen/,/^total/p' "/tmp/logs/$name.log"; } >> "$OUT/run.log"
  [ $rc -eq 0 ] || tail -30 "/tmp/logs/$name.log" >> "$OUT/run.log"
  mkdir -p "$OUT/$name"; cp runs/$name/plots/*.png "$OUT/$name/" 2>/dev/null
  cp "/tmp/logs/$name.log" "$OUT/$name/train.log"
}
IFS=';' read -ra GROUPS_ <<< "$PLAN"
for group in "${GROUPS_[@]}"; do
  IFS=',' read -ra NAMES <<< "$group"
  for name in "${NAMES[@]}"; do recipe "$(echo $name | xargs)" & done
  wait
done
log "done"
