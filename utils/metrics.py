"""Retrieval metrics: text-to-audio ranking (DCASE task 6b conventions) and, as most audio-text retrieval papers
also report it, audio-to-text ranking."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

RECALL_CUTOFFS = (1, 5, 10)
MAP_CUTOFF = 10
METRIC_NAMES = (*(f"R@{k}" for k in RECALL_CUTOFFS), f"mAP@{MAP_CUTOFF}")
AUDIO_TO_TEXT = "a2t_"  # the prefix of the audio-to-text metrics where both directions are logged


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


def grouped_average_precision(ranks: torch.Tensor, query: torch.Tensor, queries: int, cutoff: int) -> torch.Tensor:
    """AP@k of each query from the 1-based ranks of all its relevant items: (1/n) * sum over its ranks
    r_1 <= r_2 <= ... <= r_n that are <= k of i / r_i.

    ranks: (items,) each relevant item's rank in its query's ranking; query: (items,) the query it belongs to.
    Returns (queries,).
    """
    counts = torch.bincount(query, minlength=queries)
    if len(counts) > queries:
        raise ValueError(f"relevant items of query {len(counts) - 1}, but there are {queries} queries")
    if not counts.all():
        raise ValueError(f"queries without a relevant item: {(counts == 0).nonzero().flatten().tolist()[:10]}")
    order = torch.argsort(ranks, stable=True)
    order = order[torch.argsort(query[order], stable=True)]  # by query, then by rank
    ranks, query = ranks[order].float(), query[order]
    first = torch.cumsum(counts, dim=0) - counts
    position = torch.arange(1, len(ranks) + 1, device=ranks.device) - first[query]  # i: 1 for a query's best
    precision = torch.where(ranks <= cutoff, position / ranks, torch.zeros_like(ranks))
    return torch.zeros(queries, device=ranks.device).index_add_(0, query, precision) / counts


def multi_match_average_precision(scores: torch.Tensor, relevant: torch.Tensor, cutoff: int) -> torch.Tensor:
    """AP@k of one query with several relevant clips (ranks with ties against the query, as in `target_ranks`).

    scores: (clips,) of one query; relevant: (n,) clip indices.
    """
    ranks = (scores.unsqueeze(0) >= scores[relevant].unsqueeze(1)).sum(dim=1)
    return grouped_average_precision(ranks, torch.zeros_like(ranks), 1, cutoff)[0]


def audio_to_text_metrics(scores: torch.Tensor, targets: torch.Tensor, block: int = 1024) -> dict[str, float]:
    """Each clip ranks every caption of the split; its own captions are the relevant ones. R@k: the share of clips
    with at least one of their captions among the first k (the convention of the audio-text retrieval literature,
    which ranks a clip by its best caption); mAP@10: AP@10 over all of a clip's captions, as for DCASE 2025's
    multi-match queries. Ties count against the clip.

    scores: (captions, clips); targets: (captions,) index of each caption's clip. Compared in blocks of `block`
    captions, so memory stays (block, captions) booleans.
    """
    scores, targets = scores.float(), targets.long()
    if targets.shape != (scores.shape[0],):
        raise ValueError(f"targets must have shape ({scores.shape[0]},), got {tuple(targets.shape)}")
    clips = scores.shape[1]
    by_clip = scores.t()
    own = scores.gather(1, targets.unsqueeze(1))  # (captions, 1): each caption's score with its clip
    ranks = torch.cat([(by_clip[targets[rows]] >= own[rows]).sum(dim=1)
                       for rows in torch.arange(len(targets), device=scores.device).split(block)])
    best = torch.full((clips,), len(targets) + 1, device=scores.device).scatter_reduce(0, targets, ranks, "amin")
    metrics = {f"R@{k}": (best <= k).float().mean().item() for k in RECALL_CUTOFFS}
    metrics[f"mAP@{MAP_CUTOFF}"] = grouped_average_precision(ranks, targets, clips, MAP_CUTOFF).mean().item()
    return metrics


def audio_to_text_chance(captions_per_clip: Sequence[int]) -> dict[str, float]:
    """Expected audio-to-text metrics of a random ranking of a split's N captions, its clips having these numbers of
    captions. A clip with n has one among the first k with probability 1 - C(N-n, k) / C(N, k); the caption at rank
    r is its own with probability n/N, and then (r-1)(n-1)/(N-1) of its own are expected above it."""
    if not captions_per_clip or min(captions_per_clip) < 1:
        raise ValueError(f"captions_per_clip={list(captions_per_clip)[:10]}: every clip needs a caption")
    total = sum(captions_per_clip)

    def expected(n: int) -> dict[str, float]:
        recall = {f"R@{k}": 1 - math.comb(total - n, min(k, total)) / math.comb(total, min(k, total))
                  for k in RECALL_CUTOFFS}
        precisions = sum((1 + (rank - 1) * (n - 1) / max(total - 1, 1)) / rank
                         for rank in range(1, min(MAP_CUTOFF, total) + 1))
        return {**recall, f"mAP@{MAP_CUTOFF}": precisions / total}  # (1/n) * (n/N) * the sum

    per_clip = [expected(n) for n in captions_per_clip]
    return {name: sum(metrics[name] for metrics in per_clip) / len(per_clip) for name in per_clip[0]}


def split_chance(captions_per_clip: Sequence[int]) -> dict[str, float]:
    """Both directions' chance metrics of an evaluation split, named as its evaluation logs them."""
    audio_to_text = audio_to_text_chance(captions_per_clip)
    return {**chance_metrics(len(captions_per_clip)),
            **{f"{AUDIO_TO_TEXT}{name}": value for name, value in audio_to_text.items()}}


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
