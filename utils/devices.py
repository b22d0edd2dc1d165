"""Host tensors onto the device without making the host wait."""
from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device`. Onto a GPU through pinned memory: a copy from pageable memory waits for
    all the work queued before it, a copy from pinned memory does not."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
