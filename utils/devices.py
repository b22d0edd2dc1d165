"""What a GPU offers the run's settings, and host tensors onto the device without making the host wait."""
from __future__ import annotations

import torch

BF16_TENSOR_CORES = (8, 0)  # compute capability of the first GPUs (Ampere) whose tensor cores multiply bf16


def bf16_problem(precision: str, gpu_name: str, capability: tuple[int, int]) -> str | None:
    """Why `precision` does not suit this GPU, or None. Before Ampere (T4, RTX 20xx) torch still runs bf16 autocast,
    but the matrix products cannot use the tensor cores that the same GPU has for fp16: a run that asked for bf16 to
    be fast (fast_gpu, lean_single_gpu) would crawl without saying why."""
    if not str(precision).startswith("bf16") or tuple(capability) >= BF16_TENSOR_CORES:
        return None
    major, minor = capability
    return (f"precision={precision!r} on {gpu_name} (compute capability {major}.{minor}): its tensor cores multiply "
            f"fp16 but not bf16 (tensor cores do from compute capability 8.0, Ampere, on), so bf16's matrix products "
            f"would run without them, far slower: set precision=16-mixed (fp16 AMP, the published setting; "
            f"fast_gpu, lean_single_gpu and make train set bf16-mixed)")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device`. Onto a GPU through pinned memory: a copy from pageable memory waits for
    all the work queued before it, a copy from pinned memory does not."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
