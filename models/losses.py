"""Contrastive objective for caption-audio batches in which a clip can appear more than once."""
from __future__ import annotations

import torch
import torch.nn.functional as F

POSITIVE_WEIGHTINGS = ("pair", "row")


def positive_mask(clip_ids: torch.Tensor) -> torch.Tensor:
    """(batch, batch) boolean: True where caption i and audio j come from the same clip."""
    return clip_ids.unsqueeze(1) == clip_ids.unsqueeze(0)


def multi_positive_contrastive_loss(scores: torch.Tensor, clip_ids: torch.Tensor,
                                    weighting: str = "pair") -> torch.Tensor:
    """Symmetric cross-entropy with every same-clip pair as a positive.

    scores: (captions, audios) logits for a batch where caption i was drawn with audio i; clip_ids: (batch,).
    Both directions take log-softmaxes (over clips per caption, over captions per clip) at the positives:
    - `pair` (published): the mean over all positive pairs, so a clip drawn k times weighs k^2;
    - `row`: each caption's (each clip's) target spreads uniformly over its positives, every row weighs the same.
    Without repeated clips in the batch both are the usual symmetric InfoNCE.
    """
    if scores.shape[0] != scores.shape[1] or scores.shape[0] != clip_ids.shape[0]:
        raise ValueError(f"scores {tuple(scores.shape)} must be square and match clip_ids {tuple(clip_ids.shape)}")
    return sharded_contrastive_loss(scores, scores, clip_ids, slice(0, len(clip_ids)), weighting)


def sharded_contrastive_loss(caption_scores: torch.Tensor, clip_scores: torch.Tensor, clip_ids: torch.Tensor,
                             own: slice, weighting: str = "pair") -> torch.Tensor:
    """One shard's part of `multi_positive_contrastive_loss` on a batch split over shards (ranks).

    caption_scores: (own captions, all clips); clip_scores: (all captions, own clips); clip_ids: (all,) global ids;
    `own`: the shard's positions in the global batch. Summed over shards it equals the loss of the whole batch,
    in value and gradients, while each shard scores only its own rows and columns.
    """
    positives = positive_mask(clip_ids).to(caption_scores.dtype)
    if weighting == "pair":
        caption_weights = positives[own] / positives.sum()
        clip_weights = positives[:, own] / positives.sum()
    elif weighting == "row":
        caption_weights = positives[own] / positives[own].sum(dim=1, keepdim=True) / len(positives)
        clip_weights = positives[:, own] / positives[:, own].sum(dim=0, keepdim=True) / len(positives)
    else:
        raise ValueError(f"positive_weighting={weighting!r} is not one of {', '.join(POSITIVE_WEIGHTINGS)}")
    text_to_audio = (caption_weights * F.log_softmax(caption_scores, dim=1)).sum()
    audio_to_text = (clip_weights * F.log_softmax(clip_scores, dim=0)).sum()
    return -0.5 * (text_to_audio + audio_to_text)


def distillation_loss(scores: torch.Tensor, teacher_similarities: torch.Tensor, temperature: torch.Tensor | float
                      ) -> torch.Tensor:
    """Stage 2 (salsa): the student's logits against correspondences estimated by stage-1 models.

    scores: the student's (captions, clips) logits; teacher_similarities: (teachers, captions, clips) cosine
    similarities of the batch by each stage-1 model. The targets are their mean divided by the student's
    temperature, made distributions by a softmax over clips (per caption) and over captions (per clip); the loss
    is the mean of the two cross-entropies, each averaged over its rows.
    """
    if teacher_similarities.dim() != 3 or teacher_similarities.shape[1:] != scores.shape:
        raise ValueError(f"teacher similarities {tuple(teacher_similarities.shape)} must be (teachers, "
                         f"{scores.shape[0]}, {scores.shape[1]}) for scores {tuple(scores.shape)}")
    targets = teacher_similarities.mean(dim=0) / temperature
    caption_to_clip = F.cross_entropy(scores, targets.softmax(dim=1))
    clip_to_caption = F.cross_entropy(scores.t(), targets.t().softmax(dim=1))
    return 0.5 * (caption_to_clip + clip_to_caption)
