import math

import pytest
import torch

from models.losses import multi_positive_contrastive_loss


def direct_loss(scores, clip_ids):
    """Per-row average of -log softmax over the positives, both directions, written out."""
    n = len(clip_ids)
    total = 0.0
    transposed = [list(column) for column in zip(*scores)]
    for matrix in (scores, transposed):
        for i in range(n):
            log_denominator = math.log(sum(math.exp(matrix[i][j]) for j in range(n)))
            positives = [j for j in range(n) if clip_ids[j] == clip_ids[i]]
            total += sum(log_denominator - matrix[i][j] for j in positives) / len(positives) / n
    return total / 2


def test_matches_direct_computation_with_repeated_clips():
    torch.manual_seed(0)
    scores = torch.randn(6, 6, dtype=torch.float64) * 3
    clip_ids = torch.tensor([4, 7, 4, 1, 7, 4])
    assert multi_positive_contrastive_loss(scores, clip_ids).item() == pytest.approx(
        direct_loss(scores.tolist(), clip_ids.tolist()), rel=1e-9)


def test_same_clip_captions_are_not_negatives():
    together = torch.tensor([[10.0, 10.0, -10.0], [10.0, 10.0, -10.0], [-10.0, -10.0, 10.0]])
    apart = torch.tensor([[10.0, -10.0, -10.0], [-10.0, 10.0, -10.0], [-10.0, -10.0, 10.0]])
    same_clip = torch.tensor([0, 0, 1])
    # Rows of two captions of one clip split their target over both positives: log 2 each, 2/3 log 2 overall.
    assert multi_positive_contrastive_loss(together, same_clip).item() == pytest.approx(2 / 3 * math.log(2), abs=1e-6)
    # Pushing them apart is penalised, unlike a diagonal-only target that would reward it.
    assert multi_positive_contrastive_loss(apart, same_clip) > multi_positive_contrastive_loss(together, same_clip)
    distinct = torch.tensor([0, 2, 1])
    assert multi_positive_contrastive_loss(apart, distinct) < multi_positive_contrastive_loss(together, distinct)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="square"):
        multi_positive_contrastive_loss(torch.zeros(3, 4), torch.arange(3))
