#!/usr/bin/env bash
# Runs the GPU tables of docs/RESULTS.md by name; see --help.
set -uo pipefail

usage() {
  cat <<'EOF'
Usage: bash bench/run_gpu.sh [--out DIR] TABLE [TABLE ...]

Runs the benchmarks behind the tables of docs/RESULTS.md, each in its own process (XLA flags and compile
caches do not leak between them), from the repository root. Each process's output goes to DIR/NAME.log and,
where the script writes one, DIR/NAME.json; DIR also gets device.txt (GPU, driver, jax and flax versions).
A failing table does not stop the others; the exit status is non-zero if any failed.

Tables:
  train         distillation step throughput and MFU (RESULTS.md section 1)
  spec-default  speculative decoding of the distilled default pair (section 2.1); converts the default
                teacher and trains the target and draft recipes first when their outputs are missing
  spec-b1       speculative decoding of 1B/3B-shaped random-weight hybrids, batch 1 (section 2.2)
  spec-b8       the same at batch 8 (section 2.2)
  spec-verify   the cost of one verification call per K (section 2.2)
  verify        the verify kernel against one single-step update, batch 1 and 8 (section 3)
  bandwidth     the verify kernel's bandwidth at batch 32, 128, 256 (section 3)
  scan          the training scans against the lax.scan reference (section 3)
  scan-bwd      the Mamba-1 scan's backward kernel by tile (section 3)
  decode-b1     plain greedy decoding beside transformers, batch 1, both shapes (section 2.3)
  decode-b64    the same at batch 64, prompt 2048, 512 new tokens, 1B shape (section 2.3)
  decode-flags  batch-1 decoding of the 135M shape (teacher, 50% Mamba-2) under XLA flag sets that change how
                the step's kernels are launched: the defaults, command buffers off, command buffers for
                kernels and library calls without the loop (section 2.3)
  decode-profile
                one traced batch-1 call of the 135M shape (teacher, 50% Mamba-2; prompt 128, 256 new tokens)
                summarised by kernel kind: kernels and GPU-busy time per step against the step's span, which
                says whether launches or the kernels themselves set the step's time (section 2.3)
  decode-max    the largest batch that fits, prompt 2048, 512 new tokens, 1B shape, every hybrid_jax model
                (section 2.3)
  fidelity      the GPU fidelity recipes (default: 50% attention, both variants) with their held-out table
                (section 4; bench/fidelity.py; converts the default teacher first when it is missing); a
                stopped run resumes when run again
  fidelity-ablation
                50% Mamba-2 distillation settings from one alignment model (made by the first setting
                when no run has it): the recipe (the replaced layers train on chat and teacher-written
                documents), the replaced layers on chat only, every parameter on chat only
                (runs/fidelity_<name>/, section 4)
  fidelity-init the init ablation after the same training: the fidelity recipes (default: 25% attention,
                Mamba-2) with the replaced layers' mixer, MLP and norms at their own random init
                (model.mixer_init=random_layer, the reference's init_with_kqvo=False) in
                runs/fidelity_random_layer/, beside the fidelity table's attention-initialised run
                (INIT_ABLATION.md)
  spec-fidelity speculative decoding of the 50% Mamba-2 fidelity model with the drafts that need no
                training: prompt lookup and layer-skip self-drafts, in the checkpoint's bfloat16 and again
                in float32 (section 2.1)
  harness       lm-evaluation-harness loglikelihood throughput against HFLM, 1B shape (section 6)
  kernels       verify, bandwidth, scan and scan-bwd
  all           every table

Options:
  --out DIR     where logs go (default: runs/bench)
  -h, --help    this text
Environment: PYTHON (default: python3), TEACHER (default teacher directory, spec-default;
default: .cache/teachers/smollm2-135m-instruct), FIDELITY_RECIPES (bench/fidelity.py --recipes; default:
mamba2_attn50,mamba_attn50), FIDELITY_DEADLINE_S (seconds for all fidelity runs of this call, after which
the running stage is checkpointed and the rest waits for the next call; default 0, no limit), FIDELITY_ARGS
(more bench/fidelity.py arguments, e.g. --smoke for a CPU check of the fidelity tables), FIDELITY_MODEL
(the spec-fidelity target; default: the fidelity table's 50% Mamba-2 model), FIDELITY_INIT_RECIPES
(fidelity-init's recipes; default: mamba2_attn25), FIDELITY_JOBS (stages run side by side, each on its own
GPU; default: the number of GPUs). With several GPUs, fidelity-ablation runs its settings side by side too,
one per GPU, once an alignment model exists.
EOF
}

OUT=runs/bench
TABLES=()
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --out) [ $# -ge 2 ] || { echo "run_gpu.sh: --out needs a directory" >&2; exit 2; }; OUT=$2; shift 2 ;;
    --out=*) OUT=${1#--out=}; shift ;;
    -*) echo "run_gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) TABLES+=("$1"); shift ;;
  esac
done
[ ${#TABLES[@]} -gt 0 ] || { echo "run_gpu.sh: name at least one table (see --help)" >&2; exit 2; }

PY=${PYTHON:-python3}
TEACHER=${TEACHER:-.cache/teachers/smollm2-135m-instruct}
KNOWN=" train spec-default spec-b1 spec-b8 spec-verify verify bandwidth scan scan-bwd decode-b1 decode-b64 decode-max \
decode-flags decode-profile fidelity fidelity-ablation fidelity-init spec-fidelity harness "
expanded=()
for t in "${TABLES[@]}"; do
  case $t in
    kernels) expanded+=(verify bandwidth scan scan-bwd) ;;
    all) expanded+=($KNOWN) ;;
    *) [[ $KNOWN == *" $t "* ]] || { echo "run_gpu.sh: unknown table $t (see --help)" >&2; exit 2; }
       expanded+=("$t") ;;
  esac
done

mkdir -p "$OUT" || exit 2
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import jax, flax, sys; print('jax', jax.__version__, 'flax', flax.__version__, 'python', sys.version.split()[0])"
} | tee "$OUT/device.txt"

if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then  # the GPUs this shell may use, by their ids
  IFS=, read -ra GPU_IDS <<< "$CUDA_VISIBLE_DEVICES"
else
  GPU_IDS=()
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  for ((g = 0; g < n; g++)); do GPU_IDS+=("$g"); done
fi
GPUS=${#GPU_IDS[@]}
[ "$GPUS" -gt 0 ] || { GPUS=1; GPU_IDS=(0); }
failed=0
run() {  # run NAME CMD...: one process, its output in NAME.log
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  [ "$rc" = 0 ] || failed=1
  return "$rc"
}

teacher() {  # the default teacher, converted once
  [ -f "$TEACHER/config.json" ] || run teacher "$PY" convert_torch.py --default-teacher --output "$TEACHER"
}

FIDELITY_MODEL=${FIDELITY_MODEL:-runs/fidelity/gpu_mamba2_attn50_align/gpu_mamba2_attn50_distill/model}
# Distillation settings compared on one alignment model, in this order: name -> bench/fidelity.py
# --distill-set arguments, ';'-separated. "recipe" is the recipe as it is, in runs/fidelity/ (the fidelity
# table's run); the others run in runs/fidelity_<name>/.
ABLATIONS=(
  "recipe:"                                                # the replaced layers train, chat and documents
  "chat:default_data.n_text=0"                             # the replaced layers train, chat only
  "all:optim.trainable=.*;default_data.n_text=0"           # every parameter trains, chat only
)
ALIGN50=gpu_mamba2_attn50_align

FIDELITY_END=$(( ${FIDELITY_DEADLINE_S:-0} > 0 ? $(date +%s) + ${FIDELITY_DEADLINE_S:-0} : 0 ))

fidelity() {  # fidelity OUTNAME [bench/fidelity.py arguments...]; every run shares FIDELITY_DEADLINE_S
  local name=$1 left=0; shift
  if [ "$FIDELITY_END" -gt 0 ]; then
    left=$(( FIDELITY_END - $(date +%s) ))
    [ "$left" -gt 30 ] || { echo "=== $name: skipped, FIDELITY_DEADLINE_S spent (run the table again)"; failed=1; return 3; }
  fi
  teacher && run "$name" "$PY" bench/fidelity.py --teacher "$TEACHER" --deadline-s "$left" \
    --jobs "${FIDELITY_JOBS:-$GPUS}" ${FIDELITY_ARGS:-} "$@" --out "$OUT/$name"
}

fidelity_ablation() {  # every setting starts from the same alignment model: the first one made is copied
  local a name runs src="" d sets s parts=() pids=() slot=0 pid
  for a in "${ABLATIONS[@]}"; do
    name=${a%%:*}
    runs=runs/fidelity_$name
    [ "$name" = recipe ] && runs=runs/fidelity
    if [ -z "$src" ]; then
      for d in runs/fidelity runs/fidelity_*; do
        [ -f "$d/$ALIGN50/model/config.json" ] && { src=$d/$ALIGN50; break; }
      done
    fi
    if [ -n "$src" ] && [ ! -f "$runs/$ALIGN50/model/config.json" ]; then
      rm -rf "$runs/$ALIGN50" && mkdir -p "$runs" && cp -r "$src" "$runs/" && rm -rf "$runs/$ALIGN50"/gpu_*
    fi
    sets=(--recipes mamba2_attn50 --runs "$runs")
    IFS=';' read -ra parts <<< "${a#*:}"
    for s in "${parts[@]}"; do [ -n "$s" ] && sets+=(--distill-set "$s"); done
    if [ -n "$src" ] && [ "$GPUS" -gt 1 ]; then  # the alignment model exists: one setting per GPU, side by side
      echo "=== fidelity-$name: on GPU ${GPU_IDS[slot % GPUS]}, output in $OUT/fidelity-$name.log"
      CUDA_VISIBLE_DEVICES=${GPU_IDS[slot % GPUS]} FIDELITY_JOBS=1 fidelity "fidelity-$name" "${sets[@]}" > /dev/null &
      pids+=($!)
      slot=$((slot + 1))
    else
      fidelity "fidelity-$name" "${sets[@]}" || return
    fi
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  [ ${#pids[@]} -eq 0 ] || cat "$OUT"/fidelity-*/fidelity.md 2>/dev/null
}

spec_default() {
  teacher || return
  local train=("$PY" train.py --stage=distill --teacher "$TEACHER" --no-progress)
  if [ ! -f runs/distill_gpu/model/config.json ]; then
    run spec-default-target "${train[@]}" --config configs/distill_gpu.yaml --overwrite || return
  fi
  if [ ! -f runs/draft_gpu/model/config.json ]; then
    run spec-default-draft "${train[@]}" --config configs/distill_draft_gpu.yaml --overwrite || return
  fi
  run spec-default "$PY" bench/bench_speculative.py --target runs/distill_gpu/model --draft runs/draft_gpu/model \
    --parts "" --sizes "" --ks 1,2,3,4,6 --max-new 256 --json "$OUT/spec-default.json"
}

for t in "${expanded[@]}"; do
  case $t in
    train)
      B=(bench/bench_train.py --seq-len 2048)
      run train-llama1b-mamba2 "$PY" "${B[@]}" --models llama1b --variants mamba2 --steps 5 \
        --json "$OUT/train-llama1b-mamba2.json"
      run train-llama1b-mamba "$PY" "${B[@]}" --models llama1b --variants mamba --teacher-dtype bfloat16 --batch 2 \
        --steps 5 --json "$OUT/train-llama1b-mamba.json"
      run train-default "$PY" "${B[@]}" --models default --variants mamba2 --steps 10 --json "$OUT/train-default.json" ;;
    spec-default) spec_default ;;
    spec-b1) run spec-b1 "$PY" bench/bench_speculative.py --sizes 1b,3b --variants mamba2,mamba --batches 1 \
               --json "$OUT/spec-b1.json" ;;
    spec-b8) run spec-b8 "$PY" bench/bench_speculative.py --sizes 1b,3b --variants mamba2,mamba --batches 8 \
               --ks 1,2,3,4 --json "$OUT/spec-b8.json" ;;
    spec-verify) run spec-verify "$PY" bench/bench_speculative.py --parts b --sizes 1b --variants mamba2,mamba \
                   --ks 1,2,4,8,16 --json "$OUT/spec-verify.json" ;;
    verify) run verify "$PY" bench/verify_ratio.py --seeds 4 ;;
    bandwidth) run bandwidth "$PY" bench/verify_ratio.py --seeds 3 --batches 32,128,256 --ks 1 --bandwidth ;;
    scan) run scan "$PY" bench/bench_kernels.py --skip verify,sweep --bw-batches "" --out "$OUT/scan.json" ;;
    scan-bwd) run scan-bwd "$PY" bench/scan_bwd.py --tiles 256,512,1024,2048 ;;
    decode-b1) run decode-b1 "$PY" bench/bench_decode.py --shapes 135m,1b --cases b1 --out "$OUT/decode-b1.json" ;;
    decode-b64) run decode-b64 "$PY" bench/bench_decode.py --shapes 1b --cases b64 --out "$OUT/decode-b64.json" ;;
    decode-flags)
      i=0
      for f in "" "--xla_gpu_enable_command_buffer=" \
               "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"; do
        XLA_FLAGS="${XLA_FLAGS:-} $f" run "decode-flags-$i" "$PY" bench/bench_decode.py --shapes 135m --cases b1 \
          --only teacher,h50-mamba2 --repeats 3 --out "$OUT/decode-flags-$i.json"
        i=$((i + 1))
      done ;;
    decode-profile)
      rm -rf "$OUT/decode-profile"
      run decode-profile "$PY" bench/bench_decode.py --shapes 135m --cases b1 --only teacher,h50-mamba2 --repeats 1 \
        --profile "$OUT/decode-profile" --out "$OUT/decode-profile.json" &&
        run decode-profile-summary "$PY" bench/profile_summary.py "$OUT/decode-profile" --steps 256 --top 25 ;;
    decode-max) run decode-max "$PY" bench/bench_decode.py --shapes 1b --cases '' --max-batch --repeats 1 \
                  --only teacher,h50-mamba2,h25-mamba2,h50-mamba,h25-mamba --out "$OUT/decode-max.json" ;;
    fidelity) fidelity fidelity --recipes "${FIDELITY_RECIPES:-mamba2_attn50,mamba_attn50}" ;;
    fidelity-ablation) fidelity_ablation ;;
    fidelity-init) fidelity fidelity-init --recipes "${FIDELITY_INIT_RECIPES:-mamba2_attn25}" \
                     --runs runs/fidelity_random_layer --set model.mixer_init=random_layer ;;
    spec-fidelity)
      [ -f "$FIDELITY_MODEL/config.json" ] || { echo "spec-fidelity: run the fidelity table first"; failed=1; continue; }
      S=(bench/bench_speculative.py --target "$FIDELITY_MODEL" --sizes "" --max-new 256 --draft ngram
         --draft self:0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 --draft self:0,2,4,6,8,10,12,14,16,18,20,22,24,26,28
         --ks 2,4,auto)
      run spec-fidelity "$PY" "${S[@]}" --json "$OUT/spec-fidelity.json"
      run spec-fidelity-fp32 "$PY" "${S[@]}" --target-dtype float32 --json "$OUT/spec-fidelity-fp32.json" ;;
    harness) run harness "$PY" bench/bench_harness.py --n 1000 --batch-size 16 --json "$OUT/harness.json" ;;
  esac
done
exit "$failed"
