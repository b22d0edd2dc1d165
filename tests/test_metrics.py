import pytest
import torch

from utils.metrics import (audio_to_text_chance, audio_to_text_metrics, chance_metrics, grouped_average_precision,
                           retrieval_metrics, split_chance, target_ranks)


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


def test_audio_to_text_ranks_each_clips_own_captions_among_all_captions():
    # captions 0, 1 belong to clip 0, captions 2, 3 to clip 1
    scores = torch.tensor([[0.9, 0.1],
                           [0.2, 0.8],
                           [0.5, 0.3],
                           [0.4, 0.7]])
    targets = torch.tensor([0, 0, 1, 1])
    # clip 0 ranks captions 0, 2, 3, 1: its own at 1 and 4; clip 1 ranks 1, 3, 2, 0: its own at 2 and 3
    metrics = audio_to_text_metrics(scores, targets)
    assert metrics["R@1"] == pytest.approx(0.5) and metrics["R@5"] == metrics["R@10"] == 1.0
    assert metrics["mAP@10"] == pytest.approx(((1 / 1 + 2 / 4) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
    assert retrieval_metrics(scores, targets)["R@1"] == pytest.approx(0.5)  # text to audio: captions 0 and 3
    tied = audio_to_text_metrics(torch.ones(4, 2), targets)  # ties count against the clip: both captions at rank 4
    assert tied["R@1"] == 0.0 and tied["mAP@10"] == pytest.approx((1 / 4 + 2 / 4) / 2)


def brute_force_audio_to_text(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    hits, precisions = {1: 0, 5: 0, 10: 0}, []
    for clip in range(scores.shape[1]):
        column = scores[:, clip]
        ranks = sorted(int((column >= column[caption]).sum()) for caption in (targets == clip).nonzero().flatten())
        for k in hits:
            hits[k] += ranks[0] <= k
        precisions.append(sum(i / rank for i, rank in enumerate(ranks, start=1) if rank <= 10) / len(ranks))
    return {**{f"R@{k}": count / scores.shape[1] for k, count in hits.items()},
            "mAP@10": sum(precisions) / len(precisions)}


@pytest.mark.parametrize("seed", range(8))
def test_audio_to_text_equals_a_clip_by_clip_count_with_ties_and_uneven_caption_counts(seed):
    generator = torch.Generator().manual_seed(seed)
    clips = 25
    targets = torch.cat([torch.arange(clips), torch.randint(0, clips, (60,), generator=generator)])  # 1 to ~8 each
    targets = targets[torch.randperm(len(targets), generator=generator)]
    scores = torch.randint(0, 6, (len(targets), clips), generator=generator).float()  # many ties
    measured = audio_to_text_metrics(scores, targets, block=7)  # blocks that do not divide the captions
    assert measured == pytest.approx(brute_force_audio_to_text(scores, targets), abs=1e-6)


def test_average_precision_needs_a_relevant_item_for_every_query():
    with pytest.raises(ValueError, match=r"queries without a relevant item: \[1\]"):
        grouped_average_precision(torch.tensor([1, 2]), torch.tensor([0, 2]), 3, 10)
    with pytest.raises(ValueError, match="relevant items of query 3, but there are 3 queries"):
        grouped_average_precision(torch.tensor([1, 2, 1]), torch.tensor([0, 1, 3]), 3, 10)
    with pytest.raises(ValueError, match=r"queries without a relevant item: \[1\]"):
        audio_to_text_metrics(torch.rand(3, 3), torch.tensor([0, 2, 2]))  # clip 1 has no caption


def test_audio_to_text_chance_matches_random_rankings():
    captions_per_clip = [5] * 20 + [1, 2, 3, 10]  # uneven, as after added captions
    targets = torch.arange(len(captions_per_clip)).repeat_interleave(torch.tensor(captions_per_clip))
    generator = torch.Generator().manual_seed(0)
    draws = [audio_to_text_metrics(torch.rand(len(targets), len(captions_per_clip), generator=generator), targets)
             for _ in range(2000)]
    expected = audio_to_text_chance(captions_per_clip)
    for name, value in expected.items():
        values = torch.tensor([draw[name] for draw in draws], dtype=torch.float64)
        standard_error = values.std() / len(values) ** 0.5
        assert abs(values.mean() - value) < 4 * standard_error, name  # a formula off by more is wrong
    assert expected["R@1"] == pytest.approx(1 / 24)  # rank 1 is a clip's own with probability n/N: 1/24 on average
    assert audio_to_text_chance([1] * 100) == pytest.approx(chance_metrics(100))  # one caption each: as text to audio
    assert split_chance([5] * 100)["R@1"] == chance_metrics(100)["R@1"]
    assert split_chance([5] * 100)["a2t_R@1"] == pytest.approx(0.01)  # 5 of 500 captions at rank 1
    with pytest.raises(ValueError, match="every clip needs a caption"):
        audio_to_text_chance([5, 0])
