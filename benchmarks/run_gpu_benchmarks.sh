#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one go, results as JSON lines in the folder given (default:
# benchmarks/gpu_results): the step levers measured last and the end-to-end `fast_gpu` fit, about 9 minutes (one
# device command); ALL=1 adds the fit without CUDA graphs, the published levers, TAP scoring and the untried
# max-autotune lever (~10 minutes more).
# Each part has its own time limit, so a slow part cannot take the others' figures with it.
set -u
out=${1:-benchmarks/gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python=${PYTHON:-python3}
step=("$python" -m benchmarks.bench_stage1 --json "$out/step.jsonl" step --config baseline --steps 30 --warmup 8)
fit=("$python" -m benchmarks.bench_stage1 --json "$out/fit.jsonl" fit --config baseline --data-dir /tmp/bench_fit
     --clips 300 1045 20 --epochs 2 --workers 12)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/machine.txt"
$python -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'lightning', lightning.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$out/machine.txt"
timeout 280 "${step[@]}" --levers host_count all_windows mel_front_end on_device cuda_graphs --evaluate-after \
    --profile-after cuda_graphs --profile-file "$out/profile_cuda_graphs.txt"  # host- or GPU-bound with the graphs?
timeout 270 "${fit[@]}" fast_gpu  # writes the data set and builds its cache first
if [ "${ALL:-0}" = 1 ]; then
    timeout 170 "${fit[@]}" fast_gpu audio_features.augment_on_device=False sentence_features.padding=longest \
        compile=False compile_mode=default  # fast_gpu before the CUDA graphs
    timeout 200 "${step[@]}" --levers published sdpa bf16 fused_adamw compile --evaluate-after published fused_adamw
    timeout 60 $python -m benchmarks.bench_tap_scoring --device cuda | tee "$out/tap_scoring.txt"
    timeout 300 "${step[@]}" --levers cuda_graphs max_autotune --evaluate-after
fi
$python -m benchmarks.bench_stage1 plot --json-in "$out/step.jsonl" --output "$out/levers.png" --target 400
