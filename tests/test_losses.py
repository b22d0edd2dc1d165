import math

import pytest
import torch

from models.losses import multi_positive_contrastive_loss


def direct_row_loss(scores, clip_ids):
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


def published_pair_loss(scores, clip_ids):
    """The published line: -0.5 * (log_softmax(C, 0)[I].mean() + log_softmax(C, 1)[I].mean())."""
    same = clip_ids.unsqueeze(0) == clip_ids.unsqueeze(1)
    return -0.5 * (torch.log_softmax(scores, dim=0)[torch.where(same)].mean()
                   + torch.log_softmax(scores, dim=1)[torch.where(same)].mean())


REPEATED = torch.tensor([4, 7, 4, 1, 7, 4])


def test_row_weighting_matches_direct_computation_with_repeated_clips():
    torch.manual_seed(0)
    scores = torch.randn(6, 6, dtype=torch.float64) * 3
    assert multi_positive_contrastive_loss(scores, REPEATED, "row").item() == pytest.approx(
        direct_row_loss(scores.tolist(), REPEATED.tolist()), rel=1e-9)


def test_pair_weighting_is_the_published_loss_and_differs_with_repeated_clips():
    torch.manual_seed(0)
    scores = torch.randn(6, 6, dtype=torch.float64) * 3
    pair = multi_positive_contrastive_loss(scores, REPEATED)
    assert pair.item() == pytest.approx(published_pair_loss(scores, REPEATED).item(), rel=1e-12)
    assert abs(pair.item() - multi_positive_contrastive_loss(scores, REPEATED, "row").item()) > 1e-3
    distinct = torch.arange(6)
    assert pair.item() != pytest.approx(0)
    assert multi_positive_contrastive_loss(scores, distinct).item() == pytest.approx(
        multi_positive_contrastive_loss(scores, distinct, "row").item(), rel=1e-12)


@pytest.mark.parametrize("weighting", ["pair", "row"])
def test_same_clip_captions_are_not_negatives(weighting):
    together = torch.tensor([[10.0, 10.0, -10.0], [10.0, 10.0, -10.0], [-10.0, -10.0, 10.0]])
    apart = torch.tensor([[10.0, -10.0, -10.0], [-10.0, 10.0, -10.0], [-10.0, -10.0, 10.0]])
    same_clip = torch.tensor([0, 0, 1])
    # Each positive of the repeated clip gets log-probability log(1/2): 2/3 log 2 per row (row), 4/5 log 2 (pair).
    expected = {"row": 2 / 3, "pair": 4 / 5}[weighting] * math.log(2)
    assert multi_positive_contrastive_loss(together, same_clip, weighting).item() == pytest.approx(expected, abs=1e-6)
    # Pushing them apart is penalised, unlike a diagonal-only target that would reward it.
    assert (multi_positive_contrastive_loss(apart, same_clip, weighting)
            > multi_positive_contrastive_loss(together, same_clip, weighting))
    distinct = torch.tensor([0, 2, 1])
    assert (multi_positive_contrastive_loss(apart, distinct, weighting)
            < multi_positive_contrastive_loss(together, distinct, weighting))


def test_rejects_mismatched_shapes_and_unknown_weighting():
    with pytest.raises(ValueError, match="square"):
        multi_positive_contrastive_loss(torch.zeros(3, 4), torch.arange(3))
    with pytest.raises(ValueError, match="positive_weighting='mean' is not one of pair, row"):
        multi_positive_contrastive_loss(torch.zeros(3, 3), torch.arange(3), "mean")
