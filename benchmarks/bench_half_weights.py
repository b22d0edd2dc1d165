"""How much of a fine-tuning step half-precision weights can hold (why `precision=bf16-true` is refused).

    python -m benchmarks.bench_half_weights --model DIR    # a transformers model directory (*.safetensors)

AdamW's first steps move every weight by about the learning rate. A weight kept in bf16 (8 significant bits) or
fp16 (11) only moves if the step is at least half the spacing of the numbers around it; for the matrices of a
pretrained encoder this prints the fraction of weights a step of each size cannot change.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

LEARNING_RATES = (2e-5, 1e-5, 2e-6, 1e-7)  # the published peak, and on down the cosine ramp to min_lr


def frozen_fraction(weights: torch.Tensor, step: float, dtype: torch.dtype) -> float:
    """Fraction of `weights` (stored in `dtype`) that a step of -`step` leaves exactly where they are."""
    stored = weights.to(dtype)
    return ((stored.float() - step).to(dtype) == stored).float().mean().item()


def matrix_weights(model_folder: Path) -> torch.Tensor:
    tensors = {}
    for file in sorted(model_folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    if not tensors:
        raise SystemExit(f"no *.safetensors file in {model_folder}")
    return torch.cat([t.float().flatten() for name, t in tensors.items() if t.ndim == 2 and "embeddings" not in name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a transformers model directory")
    weights = matrix_weights(parser.parse_args().model)
    print(f"{weights.numel():,} matrix weights, median |w| {weights.abs().median():.4f}")
    print("| step | bf16: weights left unchanged | fp16: weights left unchanged |\n| --- | --- | --- |")
    for step in LEARNING_RATES:
        print(f"| {step:g} | {frozen_fraction(weights, step, torch.bfloat16):.1%} "
              f"| {frozen_fraction(weights, step, torch.float16):.1%} |")


if __name__ == "__main__":
    main()
