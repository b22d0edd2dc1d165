import pytest
import torch

from utils.metrics import chance_metrics, retrieval_metrics, target_ranks


def test_hand_computed_ranks_and_metrics():
    # 3 captions x 12 audios; caption 0 -> audio 0 ranked 1st, caption 1 -> audio 1 ranked 3rd,
    # caption 2 -> audio 2 ranked 11th (outside mAP@10 and R@10).
    scores = torch.zeros(3, 12)
    scores[0, 0] = 5.0
    scores[1, 1], scores[1, 4], scores[1, 5] = 1.0, 2.0, 3.0
    scores[2] = torch.arange(12, 0, -1).float()  # audio 0 best ... audio 11 worst
    scores[2, 2] = 1.5  # between audio 10 (score 2) and audio 11 (score 1): rank 11
    targets = torch.tensor([0, 1, 2])
    assert target_ranks(scores, targets).tolist() == [1, 3, 11]
    metrics = retrieval_metrics(scores, targets)
    assert metrics["R@1"] == pytest.approx(1 / 3)
    assert metrics["R@5"] == pytest.approx(2 / 3)
    assert metrics["R@10"] == pytest.approx(2 / 3)
    assert metrics["mAP@10"] == pytest.approx((1 + 1 / 3 + 0) / 3)


def test_ties_count_against_the_caption():
    scores = torch.ones(2, 5)  # every clip scores the same: worst possible rank
    metrics = retrieval_metrics(scores, torch.tensor([0, 3]))
    assert target_ranks(scores, torch.tensor([0, 3])).tolist() == [5, 5]
    assert metrics["R@1"] == 0.0 and metrics["mAP@10"] == pytest.approx(0.2)


def test_several_captions_per_audio():
    scores = torch.tensor([[0.9, 0.1, 0.5],
                           [0.2, 0.8, 0.1],
                           [0.3, 0.6, 0.4],   # audio 0 ranked 3rd
                           [0.1, 0.3, 0.7]])
    targets = torch.tensor([0, 0, 0, 2])
    assert target_ranks(scores, targets).tolist() == [1, 2, 3, 1]
    assert retrieval_metrics(scores, targets)["mAP@10"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1) / 4)


def test_shape_errors():
    with pytest.raises(ValueError, match="targets must have shape"):
        retrieval_metrics(torch.zeros(3, 4), torch.tensor([0, 1]))


def test_chance_matches_random_rankings():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(20000, 100, generator=generator)
    measured = retrieval_metrics(scores, torch.randint(0, 100, (20000,), generator=generator))
    for name, value in chance_metrics(100).items():
        assert measured[name] == pytest.approx(value, abs=0.01)
    assert chance_metrics(100)["mAP@10"] == pytest.approx(0.0293, abs=1e-4)
