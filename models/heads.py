"""Projections of each modality into the shared retrieval space."""
from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """Linear map into the shared space, optionally L2-normalised along the last dimension."""

    def __init__(self, input_size: int, shared_size: int, normalize: bool = True):
        super().__init__()
        self.linear = nn.Linear(input_size, shared_size)
        self.normalize = normalize

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        projected = self.linear(features)
        return nn.functional.normalize(projected, dim=-1) if self.normalize else projected
