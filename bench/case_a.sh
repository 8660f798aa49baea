#!/usr/bin/env bash
# Speculative decoding, case (a) on one GPU: distil the default hybrid (configs/distill_gpu.yaml) and a 6-layer
# draft (configs/distill_draft_gpu.yaml) from the default teacher, then time greedy decoding with and without
# the draft (bench_speculative.py part A). STAGES (comma list, default target,draft,spec) picks the parts; stage
# `random` is the target recipe with random Mamba init (issue 3's initialisation ablation after the same
# distillation). Called by `bench/run_gpu.sh case-a`.
#
# The teacher GGUF (98 MB) is larger than one device call may carry, so it travels in parts
# (.xfer/teacher.gguf.partNN + .sha256, `split -b 50m -d`) over back-to-back calls; `bench/run_gpu.sh stash`
# copies a call's parts to /tmp/stash, where the next call on the still-warm machine finds them.
# SMOKE=1: tiny sizes, a CPU check of the whole script with the local teacher (TEACHER_GGUF=path).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$SECONDS
BUDGET=${BUDGET:-560}                  # seconds this script may use (the device call's limit is 600)
left() { echo $((BUDGET - (SECONDS - T0))); }
step() { local name=$1 limit=$2; shift 2; echo "=== $name: $* (limit ${limit}s)"; local t=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; local rc=${PIPESTATUS[0]}
  echo "=== $name: rc $rc, $((SECONDS - t)) s"; return "$rc"; }

GGUF=${TEACHER_GGUF:-/tmp/teacher.gguf}
TEACHER=${TEACHER_DIR:-/tmp/teacher}
if [ ! -f "$TEACHER/config.json" ]; then
  if [ ! -f "$GGUF" ]; then
    want=$(cat .xfer/teacher.gguf.sha256) || { echo "no .xfer/teacher.gguf.sha256"; exit 2; }
    # the union of the parts carried by this call and stashed by earlier ones, in name order
    parts=$(ls .xfer/teacher.gguf.part* /tmp/stash/teacher.gguf.part* 2>/dev/null | awk -F/ '!seen[$NF]++' \
            | awk -F/ '{print $NF" "$0}' | sort | cut -d' ' -f2)
    echo "teacher parts: $parts"
    tmp=$(mktemp /tmp/teacher.XXXXXX.gguf)
    cat $parts > "$tmp"
    got=$(sha256sum "$tmp" | cut -d' ' -f1)
    [ "$got" = "$want" ] || { echo "teacher GGUF checksum mismatch ($got != $want): a part is missing"; rm -f "$tmp"; exit 2; }
    mv "$tmp" "$GGUF"
  fi
  step convert 120 python3 convert_torch.py "$GGUF" --output "$TEACHER" || exit 1
fi

OV=(); SPEC=(--ks 1,2,3,4,6 --max-new 256)
if [ "${SMOKE:-0}" = 1 ]; then
  OV=(train.steps=2 train.log_every=1 train.eval_batches=1 data.batch_size=2 data.seq_len=64 default_data.n_train=8
      default_data.n_eval=2 default_data.max_new_tokens=8 default_data.batch_size=10)
  SPEC=(--ks 1,2 --max-new 8)
fi
RUNS=${RUNS:-runs}
T=(python3 train.py --stage=distill --teacher "$TEACHER" --no-progress --overwrite)
STAGES=",${STAGES:-target,draft,spec},"
if [[ $STAGES == *,target,* ]]; then
  step distill-target $(( $(left) - 200 )) "${T[@]}" --config configs/distill_gpu.yaml --output "$RUNS/distill_gpu" \
    "${OV[@]}" || exit 1
fi
if [[ $STAGES == *,draft,* ]]; then
  step distill-draft $(( $(left) - 120 )) "${T[@]}" --config configs/distill_draft_gpu.yaml \
    --output "$RUNS/draft_gpu" "${OV[@]}" || exit 1
fi
if [[ $STAGES == *,spec,* ]]; then
  step spec-a $(( $(left) - 10 )) python3 bench/bench_speculative.py --target "$RUNS/distill_gpu/model" \
    --draft "$RUNS/draft_gpu/model" --parts "" --sizes "" "${SPEC[@]}" --json "$OUT/spec-a.json"
fi
if [[ $STAGES == *,random,* ]] && [ "$(left)" -gt 120 ]; then
  step distill-random $(( $(left) - 5 )) "${T[@]}" --config configs/distill_gpu.yaml \
    --output "$RUNS/distill_gpu_random" model.mixer_init=random "${OV[@]}"
fi
grep -H "held-out perplexity" "$OUT"/distill-*.log 2>/dev/null
exit 0
