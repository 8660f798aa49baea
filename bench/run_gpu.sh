#!/usr/bin/env bash
# One device call: install the carried wheels (grain & co. are missing on the GPU image), then run the named
# benchmarks, each in its own process with its log and JSON under $OUT (a failure or timeout in one keeps the
# others' results).
#   bench/run_gpu.sh train spec-mamba2 spec-mamba kernels
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 1
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)" | tee -a "$OUT/device.txt"
run() { local name=$1; shift; echo "=== $name: $*"; local t=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"; echo "=== $name: rc ${PIPESTATUS[0]}, $((SECONDS - t)) s"; }
for what in "$@"; do
  case $what in
    train) run train python3 bench/bench_train.py --models default,llama1b --seq-len 2048 --steps 10 --json "$OUT/train.json" ;;
    train-remat) run train-remat python3 bench/bench_train.py --models llama1b --remat dots --batch 8 --seq-len 2048 --steps 10 --json "$OUT/train-remat.json" ;;
    # Measured end-to-end speedups at controlled acceptance (bench_speculative.py part C); --budget-s stops
    # compiling further k before the device call's 10 min limit (the JSON is rewritten after every k).
    spec-mamba2) run spec-mamba2 python3 bench/bench_speculative.py --sizes 1b,3b --variants mamba2 --batches 1 \
                   --budget-s 420 --json "$OUT/spec-mamba2.json" ;;
    spec-mamba) run spec-mamba python3 bench/bench_speculative.py --sizes 1b,3b --variants mamba --batches 1 \
                  --budget-s 420 --json "$OUT/spec-mamba.json" ;;
    spec-b8) run spec-b8 python3 bench/bench_speculative.py --sizes 1b,3b --variants mamba2,mamba --batches 8 \
               --ks 1,2,3,4 --budget-s 420 --json "$OUT/spec-b8.json" ;;
    spec-verify) run spec-verify python3 bench/bench_speculative.py --parts b --sizes 1b --variants mamba2,mamba \
                   --ks 1,2,4,8,16 --json "$OUT/spec-verify.json" ;;
    kernels) run kernels python3 bench/bench_kernels.py --out "$OUT/kernels.json" ;;
    train-1b) run train-1b python3 bench/bench_train.py --models llama1b --seq-len 2048 --steps 10 --json "$OUT/train-1b.json" ;;
    train-default) run train-default python3 bench/bench_train.py --models default --seq-len 2048 --steps 10 --json "$OUT/train-default.json" ;;
    train-prof) run train-prof python3 bench/bench_train.py --models llama1b --variants mamba2 --seq-len 2048 --steps 5 \
                  --profile /tmp/prof --json "$OUT/train-prof.json" && python3 bench/profile_summary.py /tmp/prof | tee "$OUT/profile.txt" ;;
    train-b8) run train-b8 python3 bench/bench_train.py --models llama1b --variants mamba2 --batch 8 --remat dots --seq-len 2048 --steps 5 --json "$OUT/train-b8.json" ;;
    train-sweep)  # the distill step's throughput levers, one process each (XLA flags are per process)
      B="python3 bench/bench_train.py --models llama1b --seq-len 2048 --steps 5"
      run sw-base $B --variants mamba2 --json "$OUT/sw-base.json"
      run sw-tbf16 $B --variants mamba2 --teacher-dtype bfloat16 --profile /tmp/prof2 --json "$OUT/sw-tbf16.json"
      python3 bench/profile_summary.py /tmp/prof2 | head -40 | tee "$OUT/profile2.txt"
      XLA_FLAGS=--xla_gpu_enable_triton_gemm=false run sw-notriton $B --variants mamba2 --teacher-dtype bfloat16 \
        --json "$OUT/sw-notriton.json"
      run sw-b8 $B --variants mamba2 --teacher-dtype bfloat16 --batch 8 --remat dots --json "$OUT/sw-b8.json"
      run sw-mamba $B --variants mamba --teacher-dtype bfloat16 --batch 2 --json "$OUT/sw-mamba.json"
      run sw-mamba-remat $B --variants mamba --teacher-dtype bfloat16 --batch 4 --remat full --json "$OUT/sw-mamba-remat.json" ;;
    # One call of this session: the verify-kernel sweep + tables and the training scans, then the Mamba-1 student's
    # distill-step row (its MFU was not measured before). Each under its own timeout inside the 10-min call.
    kernels-train1)
      T0=$SECONDS
      run kernels timeout 420 python3 bench/bench_kernels.py --out "$OUT/kernels.json"
      left=$((560 - (SECONDS - T0)))
      [ $left -gt 60 ] && run train-mamba timeout $left python3 bench/bench_train.py --models llama1b --variants mamba \
        --teacher-dtype bfloat16 --batch 2 --seq-len 2048 --steps 5 --json "$OUT/train-mamba.json" ;;
    # Second call: the verify kernel with y gathered in registers, (tile, warps) swept per batch; no scan table.
    kernels2) run kernels2 timeout 500 python3 bench/bench_kernels.py --skip scan --out "$OUT/kernels2.json" ;;
    # Speculative case (a): the teacher GGUF travels in parts over back-to-back calls on the warm machine:
    # `stash` keeps this call's .xfer parts in /tmp/stash, `case-a` joins them (sha256-checked) and runs
    # bench/case_a.sh (distil target + draft, time decoding; STAGES=random: the random-init target).
    stash) mkdir -p /tmp/stash && cp .xfer/teacher.gguf.part* /tmp/stash/ && ls -la /tmp/stash ;;
    case-a) run case-a bash bench/case_a.sh ;;
    # Kernel-only GPU time vs wall time per verify call (launch/dependency gaps), from a trace.
    kernels-prof) run kernels-prof timeout 300 python3 bench/profile_verify.py ;;
    # The verify tables (K = 1..16, batch 1, 8, 32) at the library's tiles, no sweep, no training scans.
    kernels-tables) run kernels-tables timeout 400 python3 bench/bench_kernels.py --skip sweep,scan --out "$OUT/kernels-tables.json" ;;
    # The per-step scalars with fast math vs libdevice (a trace of both, K = 1, 2, 4, 8), then the (tile, warps)
    # sweep and the verify tables at the swept picks. (kernels6, the same with delta computed in XLA before the
    # kernel, was this entry's first form: code at commit 2df37f4, logs in docs/device_logs/kernels6/.)
    kernels-fast) run kernels-fast-prof timeout 150 python3 bench/profile_verify.py --ab
                  run kernels-fast timeout 420 python3 bench/bench_kernels.py --skip scan --out "$OUT/kernels-fast.json" ;;
    # The K-step / 1-step ratio over several input seeds, cases interleaved (the 1-step time differs by up to 25%
    # between bench_kernels and profile_verify runs of the same call).
    verify-ratio) run verify-ratio timeout 300 python3 bench/verify_ratio.py --seeds 5 ;;
    # The acceptance table at the library's tiles (Mamba-1 batch 3-8 now (1024, 8)), with two Mamba-2 tiles of
    # 2 warps (fewer threads: less of the per-step scalar work repeated) beside.
    verify-last) run verify-last timeout 300 python3 bench/verify_ratio.py --seeds 5 --tiles-mamba2 32x2,16x2 ;;
    # The trace split (kernel vs the XLA single step's fusions) at the library's tiles, then Mamba-1 batch-8 tiles
    # with the shorter softplus.
    verify-final)
      run kernels-prof timeout 300 python3 bench/profile_verify.py
      run verify-m1tiles timeout 150 python3 bench/verify_ratio.py --seeds 3 --batches 8 --ks 1,4,8 --variants mamba \
        --tiles-mamba 1024x8,1024x4,256x4 ;;
    # (2026-12-02, commit 1f92af5) Mamba-2's new steps in the chunked form (three small IEEE dots; M2_CHUNKED)
    # against the sequential updates, a tile re-sweep at batch 8 and 1, then the acceptance table. The chunked
    # form is gone from the kernel (slower everywhere: docs/device_logs/verify-chunked).
    verify-chunked)
      run verify-chunked8 timeout 220 python3 bench/verify_ratio.py --seeds 3 --batches 8 --ks 1,4,8 --variants mamba2 \
        --set M2_CHUNKED=0 --tiles-mamba2 64x4,64x8,16x4,16x2,32x8
      run verify-chunked1 timeout 170 python3 bench/verify_ratio.py --seeds 3 --batches 1 --ks 1,4,8 --variants mamba2 \
        --set M2_CHUNKED=0 --tiles-mamba2 4x4,16x4,8x2,4x1
      run verify-ratio timeout 150 python3 bench/verify_ratio.py --seeds 5 ;;
    # (2026-12-02, commit 8400072) Tiles cut into parts (part s + 1 loads while part s computes), at batch 8 and
    # 1, then the library's tables. The parts are gone from the kernel (slower everywhere).
    verify-parts)
      run verify-parts8 timeout 240 python3 bench/verify_ratio.py --seeds 3 --batches 8 --ks 1,8 \
        --tiles-mamba2 32x4x2,64x4x2,64x8x2,32x8x2 --tiles-mamba 1024x4x2,1024x8x2,512x4x2,512x8x2
      run verify-parts1 timeout 120 python3 bench/verify_ratio.py --seeds 3 --batches 1 --ks 1,8 \
        --tiles-mamba2 16x4x2,8x4x2 --tiles-mamba 512x4x2,256x4x2
      run verify-ratio timeout 180 python3 bench/verify_ratio.py --seeds 5 ;;
    # (2026-12-02, commit 5ea45fd + BITS_BF16) Mamba-2's new steps rescaled, per-program fallback as a branch
    # around the whole update: every case timed out (compiles; the branch's predicate delays the loads). Logs in
    # docs/device_logs/verify-rescaled; the rescaled form is gone (3% fewer instructions once written without
    # that branch, not worth a second code path).
    # The acceptance table at the library's tiles (Mamba-2 batch >= 3: state in 32-column chunks; bf16 inputs
    # converted on the bits), then batch 8 against whole rows (32x4x64) and the libdevice-style conversion,
    # then batch 32 with bandwidth.
    verify-cols)
      run verify-ratio timeout 300 python3 bench/verify_ratio.py --seeds 4
      run verify-cols8 timeout 150 python3 bench/verify_ratio.py --seeds 3 --batches 8 --ks 1,8 --variants mamba2 \
        --tiles-mamba2 32x4x64 --set BITS_BF16=0
      run verify-bw32 timeout 90 python3 bench/verify_ratio.py --seeds 3 --batches 32 --ks 1 --tiles-mamba2 32x4x64 \
        --bandwidth ;;
    # Mamba-2 batch 8 with 32-column chunks: whole heads per program (64 rows, 8 warps) and half as many threads
    # (16 rows, 2 warps) against the library's (32, 4); then the library's batch-8 table again, in a process of
    # its own (the 1-step XLA reading moves by up to 13% from process to process: docs/device_logs/verify-cols).
    verify-tiles2)
      run verify-tiles2 timeout 200 python3 bench/verify_ratio.py --seeds 3 --batches 8 --variants mamba2 \
        --tiles-mamba2 64x8x32,16x2x32
      run verify-m2b8 timeout 120 python3 bench/verify_ratio.py --seeds 5 --batches 8 --variants mamba2 ;;
    # (2026-12-02, commit 84fd924) The acceptance table with the checkpoint stored after the new steps
    # (STORE_LAST, so the compiler spreads the new steps' loads over them) and, beside each case, stored before
    # them. STORE_LAST was slower everywhere (Mamba-2 batch 8 K = 8 11.6 vs 8.8 us) and is gone: run at 84fd924.
    verify-order) run verify-order timeout 190 python3 bench/verify_ratio.py --seeds 3 --batches 8,1 --ks 1,4,8 --set STORE_LAST=0 ;;
    # Nsight Compute on the verify kernel alone (bench/ncu_verify.py): where its warps stall, its memory
    # traffic and occupancy, at batch 8 (Mamba-2 K = 8 and 4, Mamba-1 K = 8).
    verify-ncu)
      which ncu || ls /opt/nvidia/nsight-compute/*/ncu
      for c in "mamba2 8 8" "mamba2 8 4" "mamba 8 8"; do
        run "ncu-${c// /-}" timeout 150 ncu --clock-control none -k regex:lambda --launch-skip 3 --launch-count 1 \
          --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
          --section Occupancy --section LaunchStats --section InstructionStats --section SourceCounters python3 bench/ncu_verify.py $c
      done ;;
    # (2026-12-02, fourth session) The checkpoint store anchored mid-kernel by reading it back as the new steps'
    # start (plain or volatile load): slower (Mamba-2 batch 8 K = 8 9.2 vs 8.8 us); gone, logs in
    # docs/device_logs/verify-fence.
    # Explicit FMAs (multistep.FMA, common.fma) against the plain a * b + c, which XLA's Triton pipeline does not
    # contract (verify-ncu: no FFMA in the kernel); then Nsight Compute on the FMA kernel and batch 32's bandwidth.
    verify-fma)
      run verify-fma timeout 330 python3 bench/verify_ratio.py --seeds 3 --set FMA=0
      run ncu-fma-mamba2-8-8 timeout 60 ncu --clock-control none -k regex:lambda --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section InstructionStats \
        python3 bench/ncu_verify.py mamba2 8 8
      run verify-bw32 timeout 90 python3 bench/verify_ratio.py --seeds 3 --batches 32 --ks 1 --bandwidth ;;
    # With the FMAs: the acceptance table in a process of its own, batch-8 tiles against the library's, and the
    # stall reasons of Mamba-2 batch 8, K = 8 (Nsight Compute).
    verify-fma2)
      run verify-ratio timeout 260 python3 bench/verify_ratio.py --seeds 4 --ks 1,2,4,8,16
      run verify-tiles-fma timeout 170 python3 bench/verify_ratio.py --seeds 3 --batches 8 --ks 1,8 \
        --tiles-mamba2 64x8x32,16x2x32,32x4x64 --tiles-mamba 512x4,2048x8
      run ncu-stalls-mamba2-8-8 timeout 60 ncu --clock-control none -k regex:lambda --launch-skip 3 --launch-count 1 \
        --section WarpStateStats --print-details all \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
        python3 bench/ncu_verify.py mamba2 8 8 ;;
    # The two PTX forms built but not yet timed (the session's device time ran out): Mamba-2's per-step scalars
    # one step per lane + shuffles (multistep.LANE_SCALARS, alone and with PTX_RCP) and softplus's reciprocal
    # as one MUFU op (PTX_RCP, Mamba-1), each beside the library's defaults in one process; the rel. error
    # column is the first check of the shuffles on hardware. Then Mamba-1's bandwidth at batch 32 and 128 (its
    # state is 1/4 of Mamba-2's: batch 32 is still launch-bound). (Both are the defaults since that run: to
    # repeat the comparison, pass LANE_SCALARS=0,PTX_RCP=0 and PTX_RCP=0.)
    verify-ptx)
      run verify-lanes timeout 300 python3 bench/verify_ratio.py --seeds 4 --variants mamba2 \
        --set LANE_SCALARS=1 --set LANE_SCALARS=1,PTX_RCP=1
      run verify-rcp timeout 150 python3 bench/verify_ratio.py --seeds 3 --variants mamba --set PTX_RCP=1
      run verify-bw-m1 timeout 50 python3 bench/verify_ratio.py --seeds 3 --batches 32,128 --ks 1 --variants mamba \
        --bandwidth ;;
    # With LANE_SCALARS and PTX_RCP the defaults: the acceptance reading (K = 1..16), Mamba-2 batch 8 tiles again
    # (per-thread scalars are gone, so smaller per-thread tiles may now pay), Mamba-1 batch 128 tiles for the
    # bandwidth, the training scans on the H200, and a second acceptance process at batch 8.
    verify-lanes2)
      run verify-acc timeout 150 python3 bench/verify_ratio.py --seeds 4 --ks 1,2,4,8,16
      run verify-tiles-lanes timeout 120 python3 bench/verify_ratio.py --seeds 3 --batches 8 --ks 4,8 --variants mamba2 \
        --tiles-mamba2 16x2x32,32x2x32,16x4x32,32x8x32,64x4x32,64x8x32,32x4x64
      run verify-bw128 timeout 60 python3 bench/verify_ratio.py --seeds 3 --batches 128 --ks 1 --bandwidth \
        --tiles-mamba 256x4,1024x4,1024x8,2048x8,2048x4 --tiles-mamba2 32x8x32,64x8x32
      run scan-h200 timeout 170 python3 bench/bench_kernels.py --skip verify,sweep --bw-batches "" --out "$OUT/scan.json"
      run verify-acc2 timeout 60 python3 bench/verify_ratio.py --seeds 4 --batches 8 --ks 1,4,8 ;;
    # Mamba-1's tile at large batch, for the bandwidth (batch 128: (2048, 4) read 64% of copy, the library's 58%)
    verify-bw-m1tiles) run verify-bw-m1tiles timeout 240 python3 bench/verify_ratio.py --seeds 3 --batches 32,64,128,256 \
        --ks 1 --bandwidth --variants mamba,mamba2 --tiles-mamba 2048x4,4096x4,4096x8,2048x2,1024x2,2048x8 ;;
    # The library as it stands (LANE_SCALARS, PTX_RCP, Mamba-1 (2048, 4) above batch 16): acceptance, bandwidth,
    # and Nsight Compute's stall reasons for Mamba-2 batch 8, K = 8.
    verify-final2)
      run verify-acc3 timeout 150 python3 bench/verify_ratio.py --seeds 4
      run verify-bw timeout 80 python3 bench/verify_ratio.py --seeds 3 --batches 32,128,256 --ks 1 --bandwidth
      run ncu-mamba2-8-8 timeout 120 ncu --clock-control none -k regex:lambda --launch-skip 3 --launch-count 1 \
        --section WarpStateStats --section SchedulerStats --section InstructionStats --section LaunchStats \
        python3 bench/ncu_verify.py mamba2 8 8 ;;
    # Mamba-1 at batch 12 and 16 (then at (512, 4), between the (1024, 8) and (2048, 4) entries; now (1024, 8))
    verify-m1mid) run verify-m1mid timeout 200 python3 bench/verify_ratio.py --seeds 3 --batches 12,16 --ks 1,4,8 \
        --variants mamba --tiles-mamba 1024x8,2048x4,1024x4 ;;
    # Mamba-1 training scan: the backward kernel (KernelOptions.bwd_impl 'kernel') against the chunked-JAX one, by tile
    scan-bwd) run scan-bwd timeout 400 python3 bench/scan_bwd.py --tiles 256,512,1024,2048 ;;
    # The Mamba-1 student's distill step with the backward kernel (the default). (Its chunked-JAX backward
    # counterpart, docs/BENCHMARKS.md's 'chunkedbwd' row, needs kernel options that the model passes to its scans.)
    train-mamba-bwd)
      B="python3 bench/bench_train.py --models llama1b --variants mamba --teacher-dtype bfloat16 --batch 2 --seq-len 2048 --steps 5"
      run train-mamba $B --json "$OUT/train-mamba.json" ;;
    # Batch 8: row tiles beyond the sweep's candidates (its trend: more rows per program, faster at K = 8).
    verify-tiles) run verify-tiles timeout 200 python3 bench/verify_ratio.py --seeds 3 --batches 8 --ks 1,4,8 \
                    --tiles-mamba2 64x4,64x8,32x8 --tiles-mamba 1024x4,1024x8 ;;
    # Batch 32 (34 / 10 MB per Mamba-2 / Mamba-1 call: a bandwidth reading): (tile, warps) swept with larger
    # tiles, then K = 1, 4, 8 at the picks.
    kernels4) run kernels4 timeout 480 python3 bench/bench_kernels.py --skip scan --sweep-batches 32 \
                --batches "" --bw-batches 32 --out "$OUT/kernels4.json" ;;
    *) echo "unknown benchmark $what"; exit 2 ;;
  esac
done
