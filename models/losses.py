"""Contrastive objective for caption-audio batches in which a clip can appear more than once."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def positive_mask(clip_ids: torch.Tensor) -> torch.Tensor:
    """(batch, batch) boolean: True where caption i and audio j come from the same clip."""
    return clip_ids.unsqueeze(1) == clip_ids.unsqueeze(0)


def multi_positive_contrastive_loss(scores: torch.Tensor, clip_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy with every same-clip pair as a positive.

    scores: (captions, audios) logits for a batch where caption i was drawn with audio i;
    clip_ids: (batch,). Each row (and column) is a soft-target cross-entropy whose target spreads
    uniformly over its positives, so a batch holding two captions of one clip does not push them apart.
    """
    if scores.shape[0] != scores.shape[1] or scores.shape[0] != clip_ids.shape[0]:
        raise ValueError(f"scores {tuple(scores.shape)} must be square and match clip_ids {tuple(clip_ids.shape)}")
    positives = positive_mask(clip_ids).to(scores.dtype)
    targets = positives / positives.sum(dim=1, keepdim=True)
    text_to_audio = -(targets * F.log_softmax(scores, dim=1)).sum(dim=1).mean()
    audio_to_text = -(targets * F.log_softmax(scores.t(), dim=1)).sum(dim=1).mean()
    return 0.5 * (text_to_audio + audio_to_text)
