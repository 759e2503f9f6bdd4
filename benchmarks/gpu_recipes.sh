#!/usr/bin/env bash
# One GPU lease call that trains train.py recipes on the carried real data, in an order with side-by-side groups.
# Usage: bash benchmarks/gpu_recipes.sh PLAN
#   PLAN: groups separated by ';' run one after another; the recipes of a group (configs/train/NAME.yaml, names
#   separated by ',') run side by side: the tiny models leave an H200 mostly idle, so independent runs (stage III and
#   its dense control, the four Uni-MoE stage-2 modality runs) share it and halve the wall time.
#   e.g. "moe_llava_stage1;moe_llava_stage2;moe_llava_stage3,moe_llava_stage2_more"
# Env: WORKERS (loader workers per run; default: 14 shared by the runs of a group, at least 2 each), EXTRA (more train.py arguments for every run), DEADLINE_S (stop
# every run still going this many seconds after the start, default 560: a lease call is capped at 600 s, and a run cut
# there leaves its logs unsaved), FRESH=1 (start every run again instead of resuming it).
# Runs RESUME from their last checkpoint by default (--ckpt_path last; a run with none starts from scratch): a recipe
# cut by the deadline continues in the next call on the same warm machine, and a finished one only re-tests. A group
# runs only when every run of the groups before it finished.
# Needs: $OUT (results), .carry/whl (jsonargparse & co.; open_clip + ftfy + wcwidth), .carry/data (the datasets the
# recipes read). Runs land in runs/ (kept between calls on a warm machine); each run's summary line goes to
# $OUT/summaries.jsonl, its trainable table and failures to $OUT/run.log, its log, metrics.csv and plots to
# $OUT/runs.tgz (runs/<run>/).
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
  if [ "${FRESH:-0}" != 1 ] && [ -f "runs/$name/test_metrics.json" ] && [ -f "/tmp/logs/$name.log" ]; then
    log "$name already finished in an earlier call"; return 0  # its summary and files went back with that call
  fi
  local left=$(( ${DEADLINE_S:-560} - ($(date +%s) - T0) ))
  if [ $left -lt 20 ]; then log "$name skipped: ${left}s left before the deadline"; return 1; fi
  local start_args="--ckpt_path last"; [ "${FRESH:-0}" = 1 ] && start_args="--overwrite true"
  # SIGINT first: Lightning stops cleanly (its last checkpoint stays the one written every N steps).
  timeout -s INT -k 20 "$left" python3 train.py --config "configs/train/$name.yaml" $start_args \
    --data.init_args.num_workers="$workers" --trainer.enable_progress_bar=false ${EXTRA:-} \
    > "/tmp/logs/$name.log" 2>&1
  local rc=$?
  log "$name rc=$rc in $(( $(date +%s) - t ))s"
  echo "{\"stage\": \"$name\", \"summary\": $(tail -1 /tmp/logs/$name.log | grep '^{' || echo null)}" >> "$OUT/summaries.jsonl"
  { echo "== $name"; sed -n '/trainable \/ frozen/,/^total/p' "/tmp/logs/$name.log"; } >> "$OUT/run.log"
  [ $rc -eq 0 ] || tail -30 "/tmp/logs/$name.log" >> "$OUT/run.log"
  mkdir -p "$OUT/runs/$name"; cp runs/$name/plots/*.png runs/$name/metrics.csv "$OUT/runs/$name/" 2>/dev/null
  cp "/tmp/logs/$name.log" "$OUT/runs/$name/train.log"
  return $rc
}
IFS=';' read -ra GROUPS_ <<< "$PLAN"
for group in "${GROUPS_[@]}"; do
  IFS=',' read -ra NAMES <<< "$group"
  pids=(); workers=${WORKERS:-$(( 14 / ${#NAMES[@]} ))}; [ "$workers" -ge 2 ] || workers=2
  for name in "${NAMES[@]}"; do recipe "$(echo $name | xargs)" & pids+=($!); done
  failed=0
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  if [ $failed = 1 ]; then log "stopping: a run of group '$group' did not finish"; break; fi
done
# The lease returns at most 8 files: every run's logs, metrics and plots travel as one archive.
[ -d "$OUT/runs" ] && tar czf "$OUT/runs.tgz" -C "$OUT" runs && rm -rf "$OUT/runs"
log "done"
