#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one go, results as JSON lines in the folder given (default:
# benchmarks/gpu_results). By default what one device command (at most 9.1 minutes) must bring: the end-to-end fit with
# the whole step recorded as one CUDA graph and each batch copied to the GPU beside it (`fast_gpu graph_step`; on a
# fresh machine the HDF5 cache is written first and every kernel
# compiled; run 5: 226 s on an H200), then the recorded step alone, whose row says whether its replays draw patchout
# afresh (`replays_draw_afresh`), then, where at least 170 s are left, the same fit with the copy in line on the
# compute stream (what `overlap_batch_copy` buys, on the same machine; the data set, its cache and the compiled kernels
# are there by then: run 5's warm rerun took 136 s); each fit with 10 steps of one more
# epoch profiled (does the real loop wait for the GPU, or the GPU for the host and the loader?), the run's output in
# fit_run_*.log as it comes, so a fit stopped by its limit shows how far it got. STEP=1 runs instead the model step
# alone (at most 9.1 minutes): the CUDA-graph step, the recorded step (with `replays_draw_afresh`) and its profile, then
# the real windows only under CUDA graphs, warmed up on every window total. The step trains with the published patchout
# since 2026-11-27; runs 1-4 did not (`--patchout 0 0` repeats them). AUTOTUNE=1 runs instead the one GPU lever left
# untried, `max_autotune` (inductor chooses its matrix kernels by timing them; long compilation), against the CUDA-graph
# step on the same machine, with its profile (at most 9.3 minutes). ALL=1 adds the figures of RESULTS.md measured before
# (~17 minutes more): TAP's full-split scoring and `fast_gpu` with only the real windows among them, and a checkpoint of
# the baseline's size written from the GPU three ways (Lightning's, ours, in the background), and the loader's parts on
# this machine's cores (can 12 workers and the pin-memory thread feed 400 captions/s?). LEARNING=1 runs, instead of all
# that, a command of its own (at most 9.7 minutes): does `fast_gpu` learn as the published settings (fp16 autocast,
# eager) do, on the TAP demo of a data set it was never tuned on, seed by seed (benchmarks/bench_learning.py; on a CPU
# only its levers without CUDA graphs could run); LEARNING=graph_step asks the same of `fast_gpu` with the whole step as
# one CUDA graph and each batch copied beside it (a copy the step did not wait for would train on half-copied audio).
# REAL_SIZE=1 runs instead the end-to-end fit on a data set of Clotho's sizes (3,839 / 1,045 / 1,045 clips; at most 9.5
# minutes). Each part has its own time limit, so a slow part cannot take the others' figures with it.
# COMPILE_CACHE=FILE hands every compiled fit `compile_cache=FILE`: read first if it exists (what an earlier machine
# compiled), then rewritten.
set -u
out=${1:-benchmarks/gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python=${PYTHON:-python3}
step=("$python" -m benchmarks.bench_stage1 --json "$out/step.jsonl" step --config baseline --steps 30 --warmup 8)
fit=("$python" -m benchmarks.bench_stage1 --json "$out/fit.jsonl" fit --config baseline --data-dir /tmp/bench_fit
     --clips 300 1045 20 --epochs 2 --workers 12)
cached=(${COMPILE_CACHE:+"compile_cache=$COMPILE_CACHE"})
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/machine.txt"
$python -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'lightning', lightning.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$out/machine.txt"
if [ "${LEARNING:-0}" != 0 ]; then  # rows are kept as each run finishes, so a time limit keeps those before it
    learn=("$python" -m benchmarks.bench_learning --data-dir /tmp/learn_gpu --datasets ordered:1 --aggregates TAP
           --seeds 409194 1 2)
    label=fast_gpu faster=(fast_gpu)
    if [ "$LEARNING" = graph_step ]; then  # the whole step as one CUDA graph instead of fast_gpu as shipped
        label=graph_step faster=(fast_gpu graph_step)
    fi
    timeout 250 "${learn[@]}" --label published --set accelerator=gpu precision=16-mixed  # the demo's is the CPU
    timeout 330 "${learn[@]}" --label "$label" --set "${faster[@]}" accelerator=gpu --reference published
    cp /tmp/learn_gpu/results.jsonl "$out/learning.jsonl"
    exit
fi
if [ "${REAL_SIZE:-0}" = 1 ]; then  # Clotho's sizes, as the issue asks: ~1 minute per epoch, 1,199 timed steps
    timeout 570 "$python" -m benchmarks.bench_stage1 --json "$out/fit.jsonl" fit --config baseline \
        --data-dir /tmp/bench_fit_real --clips 3839 1045 1045 --epochs 2 --workers 12 fast_gpu "${cached[@]}"
    exit
fi
if [ "${AUTOTUNE:-0}" = 1 ]; then
    timeout 550 "${step[@]}" --levers cuda_graphs max_autotune --evaluate-after --profile-after max_autotune \
        --profile-file "$out/profile_max_autotune.txt"
elif [ "${STEP:-0}" = 1 ]; then
    timeout 545 "${step[@]}" --levers cuda_graphs recorded_step real_windows_graphs --evaluate-after \
        --profile-after recorded_step --profile-file "$out/profile_recorded_step.txt"  # rows kept as each finishes
else  # the data set and its cache first
    timeout 360 "${fit[@]}" --profile-steps 10 --profile-file "$out/fit_profile_recorded_step.txt" \
        --log-file "$out/fit_run_recorded_step.log" fast_gpu graph_step "${cached[@]}"
    timeout 220 "${step[@]}" --levers recorded_step
    left=$((545 - SECONDS))
    if [ "$left" -ge 170 ]; then
        timeout "$left" "${fit[@]}" --profile-steps 10 --profile-file "$out/fit_profile_copy_in_line.txt" \
            --log-file "$out/fit_run_copy_in_line.log" fast_gpu graph_step overlap_batch_copy=False "${cached[@]}"
    else
        echo "the fit with the copy in line skipped: ${left} s left of 545"
    fi
fi
if [ "${ALL:-0}" = 1 ]; then
    timeout 40 $python -m benchmarks.bench_tap_scoring --device cuda | tee "$out/tap_scoring.txt"
    timeout 150 $python -m benchmarks.bench_checkpoint --folder /tmp/checkpoint_gpu --device cuda --repeats 2 \
        --json "$out/checkpoint.jsonl"
    timeout 120 $python -m benchmarks.bench_loader --clips 120 --workers 0 12 --batches 30 --parts \
        --pin-memory --json "$out/loader.jsonl"
    timeout 250 "${fit[@]}" fast_gpu audio_features.embed_all_windows=False "${cached[@]}"
    timeout 200 "${step[@]}" --levers host_count all_windows mel_front_end on_device --evaluate-after
    timeout 170 "${fit[@]}" fast_gpu audio_features.augment_on_device=False sentence_features.padding=longest \
        compile=False compile_mode=default  # fast_gpu before the CUDA graphs
    timeout 200 "${step[@]}" --levers published sdpa bf16 fused_adamw compile --evaluate-after published fused_adamw
fi
[ -f "$out/step.jsonl" ] && $python -m benchmarks.bench_stage1 plot --json-in "$out/step.jsonl" \
    --output "$out/levers.png" --target 400
[ -f "$out/fit.jsonl" ] && $python -m benchmarks.bench_stage1 plot-fits --json-in "$out/fit.jsonl" \
    --output "$out/fits.png" --target 400
