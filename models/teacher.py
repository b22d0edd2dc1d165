"""A stage-1 model's estimate of which captions match which clips of a training batch (salsa's stage 2).

The estimate comes from the run's stored embeddings and its own pooling: mean pooling gives the cosine of the
pooled clip and caption embeddings (salsa's targets), TAP the stage-1 model's per-pair scores.
"""
from __future__ import annotations

import torch

from data_loaders.stored_embeddings import StoredEmbeddings
from models.pooling import make_pooling
from utils.devices import to_device


class Teacher:
    """The stored embeddings move to the training device at the first batch (tens of MiB for Clotho), so that a
    batch's rows are gathered there: per step only the caption rows travel, from pinned memory."""

    def __init__(self, stored: StoredEmbeddings):
        spec = stored.pooling
        self.pooling = make_pooling(spec["aggregate"], spec["shared_size"], spec["normalize"], spec["tap_hyperparams"])
        self.pooling.load_state_dict(spec["state_dict"])
        self.pooling.eval().requires_grad_(False)
        self.windows, self.masks = stored.windows, stored.masks
        self.caption_rows = {caption: row for row, caption in enumerate(stored.captions)}
        self.caption_embeddings = torch.stack(list(stored.captions.values()))

    @torch.no_grad()
    def similarities(self, captions: list[str], clip_index: torch.Tensor) -> torch.Tensor:
        """(captions, clips) for a batch: captions by their text, clips by their index in the training set."""
        device = clip_index.device
        if self.windows.device != device:
            self.pooling.to(device)
            self.windows, self.masks, self.caption_embeddings = (
                tensor.to(device) for tensor in (self.windows, self.masks, self.caption_embeddings))
        rows = to_device(torch.tensor([self.caption_rows[caption] for caption in captions]), device)
        return self.pooling.score(self.caption_embeddings[rows], self.windows[clip_index], self.masks[clip_index])
