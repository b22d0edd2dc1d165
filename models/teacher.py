"""A stage-1 model's estimate of which captions match which clips of a training batch (salsa's stage 2).

The estimate comes from the run's stored embeddings and its own pooling: mean pooling gives the cosine of the
pooled clip and caption embeddings (salsa's targets), TAP the stage-1 model's per-pair scores.
"""
from __future__ import annotations

import torch

from data_loaders.stored_embeddings import StoredEmbeddings
from models.pooling import make_pooling


class Teacher:
    def __init__(self, stored: StoredEmbeddings):
        spec = stored.pooling
        self.pooling = make_pooling(spec["aggregate"], spec["shared_size"], spec["normalize"], spec["tap_hyperparams"])
        self.pooling.load_state_dict(spec["state_dict"])
        self.pooling.eval().requires_grad_(False)
        self.windows, self.masks, self.captions = stored.windows, stored.masks, stored.captions

    @torch.no_grad()
    def similarities(self, captions: list[str], clip_index: torch.Tensor) -> torch.Tensor:
        """(captions, clips) for a batch: captions by their text, clips by their index in the training set."""
        device = clip_index.device
        self.pooling.to(device)
        text = torch.stack([self.captions[caption] for caption in captions]).to(device)
        rows = clip_index.cpu()
        return self.pooling.score(text, self.windows[rows].to(device), self.masks[rows].to(device))
