"""Pooling a clip's window sequence into one embedding, and scoring captions against clips."""
from __future__ import annotations

import torch
from torch import nn

AGGREGATIONS = ("mean",)


def masked_mean(windows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the windows that hold audio. windows: (batch, windows, dim); mask: (batch, windows)."""
    weights = mask.to(windows.dtype).unsqueeze(-1)
    return (windows * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class MeanPooling(nn.Module):
    """Caption-independent pooling: every caption sees the same clip embedding."""

    def __init__(self, normalize: bool = True):
        super().__init__()
        self.normalize = normalize

    def forward(self, windows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = masked_mean(windows, mask)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def score(self, text: torch.Tensor, windows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Similarities (captions, clips) from text (captions, dim) and windows (clips, windows, dim)."""
        return text @ self(windows, mask).t()
