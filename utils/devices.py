"""What a GPU offers the run's settings, and tensors between host and device without making the host or the GPU
wait."""
from __future__ import annotations

from collections.abc import Callable

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


class SideStreamCopy:
    """Moves a batch (a dict; its tensors on the host, pinned) onto a GPU on a stream of its own. On the compute stream
    the copy of the next batch queues behind the step still running there (run 5's trace, H200: 61 MB of audio, 1.0 ms
    of a 36.7 ms recorded step); on a side stream it runs while that step does, whenever the host is ahead of the GPU.
    The compute stream waits for the copy before its next work, and each copied tensor is marked as used there, so the
    allocator does not hand its memory to the side stream again before that work is done."""

    def __init__(self):
        self._stream: torch.cuda.Stream | None = None

    def __call__(self, batch: dict, device: torch.device) -> dict:
        if device.type != "cuda":  # a CPU run: nothing to copy beside the step
            return _tensors_moved(batch, device)
        self._stream = self._stream or torch.cuda.Stream(device)
        compute = torch.cuda.current_stream(device)
        with torch.cuda.stream(self._stream):
            moved = _tensors_moved(batch, device)
        compute.wait_stream(self._stream)
        for value in moved.values():
            if isinstance(value, torch.Tensor):
                value.record_stream(compute)
        return moved


def _tensors_moved(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def start_host_copy(tensor: torch.Tensor) -> tuple[torch.Tensor, Callable[[], bool]]:
    """A copy of `tensor` on the host, and whether it has arrived: from a GPU into pinned memory, queued behind the
    work that computes it, so the host does not wait."""
    if tensor.device.type != "cuda":
        return tensor.detach().to("cpu", copy=True), lambda: True
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    copy.copy_(tensor.detach(), non_blocking=True)
    arrived = torch.cuda.Event()
    arrived.record(torch.cuda.current_stream(tensor.device))
    return copy, arrived.query
