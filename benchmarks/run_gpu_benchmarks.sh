#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md in one go (about 12 minutes on an H100/H200), results as JSON lines in
# the folder given (default: benchmarks/gpu_results). Each part has its own time limit, so a slow part cannot take
# the others' figures with it.
set -u
out=${1:-benchmarks/gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/machine.txt"
$python -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'lightning', lightning.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$out/machine.txt"
timeout 150 $python -m benchmarks.bench_stage1 --json "$out/step.jsonl" step --config baseline --steps 30 --warmup 8 \
    --levers published sdpa bf16 fused_adamw all_windows on_device --evaluate-after published on_device
timeout 200 $python -m benchmarks.bench_stage1 --json "$out/step.jsonl" step --config baseline --steps 30 --warmup 8 \
    --levers compile cuda_graphs --evaluate-after cuda_graphs --eval-batches 64
timeout 60 $python -m benchmarks.bench_tap_scoring --device cuda | tee "$out/tap_scoring.txt"
for graphs in "" "audio_features.augment_on_device=True sentence_features.padding=max_length compile=True \
compile_mode=reduce-overhead"; do
    timeout 240 $python -m benchmarks.bench_stage1 --json "$out/fit.jsonl" fit --config baseline --data-dir /tmp/bench_fit \
        --clips 600 1045 20 --workers 12 fast_gpu $graphs
done
