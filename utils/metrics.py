"""Retrieval metrics for text-to-audio ranking (DCASE task 6b conventions)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

RECALL_CUTOFFS = (1, 5, 10)
MAP_CUTOFF = 10
METRIC_NAMES = (*(f"R@{k}" for k in RECALL_CUTOFFS), f"mAP@{MAP_CUTOFF}")


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each caption's audio among all audios.

    scores: (captions, audios); targets: (captions,) audio index of each caption.
    Ties count against the caption (a clip scoring equal to the target is ranked above it),
    so a model that gives every clip the same score gets the worst rank, not the best.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (captions, audios), got shape {tuple(scores.shape)}")
    if targets.shape != (scores.shape[0],):
        raise ValueError(f"targets must have shape ({scores.shape[0]},), got {tuple(targets.shape)}")
    target_scores = scores.gather(1, targets.view(-1, 1))
    at_least_as_good = (scores >= target_scores).sum(dim=1)
    return at_least_as_good  # includes the target itself, so this is already 1-based


def retrieval_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """R@1/5/10 and mAP@10 (one relevant audio per caption, so AP is 1/rank).

    scores: (captions, audios) similarity; targets: (captions,) index of each caption's audio.
    Returns fractions in [0, 1].
    """
    ranks = target_ranks(scores.float(), targets.long()).float()
    metrics = {f"R@{k}": (ranks <= k).float().mean().item() for k in RECALL_CUTOFFS}
    reciprocal = torch.where(ranks <= MAP_CUTOFF, 1.0 / ranks, torch.zeros_like(ranks))
    metrics[f"mAP@{MAP_CUTOFF}"] = reciprocal.mean().item()
    return metrics


def chance_metrics(clips: int) -> dict[str, float]:
    """Expected metrics of a random ranking of `clips` clips (the target's rank is uniform)."""
    if clips < 1:
        raise ValueError(f"clips={clips} must be >= 1")
    metrics = {f"R@{k}": min(k, clips) / clips for k in RECALL_CUTOFFS}
    metrics[f"mAP@{MAP_CUTOFF}"] = sum(1.0 / rank for rank in range(1, min(MAP_CUTOFF, clips) + 1)) / clips
    return metrics


MULTI_MATCH_CUTOFFS = (16, 10)  # DCASE 2025 task 6 ranks by mAP@16


def multi_match_average_precision(scores: torch.Tensor, relevant: torch.Tensor, cutoff: int) -> torch.Tensor:
    """AP@k of one query with several relevant clips: (1/n) * sum over relevant ranks r_i <= k of i / r_i, where
    r_1 <= r_2 <= ... are their 1-based ranks (ties against the query, as in `target_ranks`).

    scores: (clips,) of one query; relevant: (n,) clip indices.
    """
    ranks = (scores.unsqueeze(0) >= scores[relevant].unsqueeze(1)).sum(dim=1).sort().values.float()
    order = torch.arange(1, len(ranks) + 1, dtype=torch.float32, device=ranks.device)
    return torch.where(ranks <= cutoff, order / ranks, torch.zeros_like(ranks)).sum() / len(ranks)


@dataclass(frozen=True)
class MultiMatch:
    """Additional correspondence annotations of a split (DCASE 2025): queries, as rows of the split's caption
    order, each with every clip that matches it."""
    query_rows: torch.Tensor  # (queries,)
    relevant: tuple[torch.Tensor, ...]  # per query: (n,) clip indices

    def metrics(self, scores: torch.Tensor) -> dict[str, float]:
        """mAP@16 and mAP@10 over the queries; scores: (captions, clips) of the whole split."""
        rows = scores[self.query_rows.to(scores.device)].float()
        return {f"mAP@{cutoff}": torch.stack([multi_match_average_precision(row, clips.to(scores.device), cutoff)
                                              for row, clips in zip(rows, self.relevant)]).mean().item()
                for cutoff in MULTI_MATCH_CUTOFFS}
