import math

import pytest
import torch
import torch.nn.functional as F

from models.pooling import OwnCaptionAttentionPooling, TextAwareAttentionPooling, masked_mean


def make_inputs(captions=7, clips=5, windows=4, width=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(captions, width, generator=generator, dtype=torch.float64), dim=-1)
    sequence = torch.randn(clips, windows, width, generator=generator, dtype=torch.float64)
    valid = torch.tensor([windows, 1, 2, windows - 1, 3][:clips])
    mask = torch.arange(windows).unsqueeze(0) < valid.unsqueeze(1)
    sequence = sequence * mask.unsqueeze(-1)  # padded rows are zero, as the encoder leaves them
    return text, sequence, mask


def make_tap(width=16, dim=8, normalize=True, **kwargs):
    torch.manual_seed(0)
    tap = TextAwareAttentionPooling(width, dim=dim, normalize=normalize, **kwargs).double()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, so the closed form is really tested
        for norm in (tap.text_norm, tap.window_norm, tap.output_norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.3, 0.3)
    return tap.eval()


def direct_embedding(tap, caption, clip_windows, valid):
    """One caption, one clip, an explicit softmax over its unpadded windows only."""
    query = tap.query(F.layer_norm(caption, caption.shape, tap.text_norm.weight, tap.text_norm.bias))
    real = clip_windows[:valid]
    normed = F.layer_norm(real, real.shape[-1:], tap.window_norm.weight, tap.window_norm.bias)
    logits = torch.stack([query @ tap.key(row) for row in normed]) / math.sqrt(query.shape[0])
    weights = torch.exp(logits - logits.max())
    weights = weights / weights.sum()
    pooled = sum(w * tap.value(row) for w, row in zip(weights, normed))
    out = tap.output_norm(tap.output(pooled))
    return F.normalize(out, dim=-1) if tap.normalize else out


@pytest.mark.parametrize("normalize", [True, False])
def test_embedding_matches_direct_computation(normalize):
    tap = make_tap(normalize=normalize)
    text, windows, mask = make_inputs()
    with torch.no_grad():
        pooled = tap(text, windows, mask)
        for caption in range(len(text)):
            for clip in range(len(windows)):
                expected = direct_embedding(tap, text[caption], windows[clip], int(mask[clip].sum()))
                torch.testing.assert_close(pooled[caption, clip], expected)


def test_padded_windows_get_zero_weight():
    tap = make_tap()
    text, windows, mask = make_inputs()
    weights, _ = tap.attention(text, windows + 5.0 * (~mask).unsqueeze(-1), mask)  # garbage in padding
    assert torch.all(weights[:, ~mask] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2], dtype=weights.dtype))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("memory_bytes", [1, 3000, 20000, 10**9])  # blocks that do and do not divide 7 x 5
def test_blocked_scores_equal_the_naive_double_loop(normalize, memory_bytes):
    tap = make_tap(normalize=normalize, scoring_memory_bytes=memory_bytes)
    text, windows, mask = make_inputs()
    with torch.no_grad():
        scores = tap.score(text, windows, mask)
        naive = torch.tensor([[direct_embedding(tap, text[c], windows[a], int(mask[a].sum())) @ text[c]
                               for a in range(len(windows))] for c in range(len(text))], dtype=scores.dtype)
    torch.testing.assert_close(scores, naive)


def test_training_scores_use_dropout_and_keep_gradients():
    tap = make_tap(p_dropout_weights=0.5, p_dropout_proj=0.5).train()
    text, windows, mask = make_inputs()
    windows.requires_grad_(True)
    first, second = tap.score(text, windows, mask), tap.score(text, windows, mask)
    assert not torch.allclose(first, second)
    first.sum().backward()
    assert windows.grad is not None and torch.all(windows.grad[~mask] == 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=0), r"tap_hyperparams.dim=0 must be a positive integer"),
    (dict(p_dropout_weights=1.0), r"tap_hyperparams.p_dropout_weights=1.0 must be in \[0, 1\)"),
    (dict(p_dropout_proj=-0.1), r"tap_hyperparams.p_dropout_proj=-0.1 must be in \[0, 1\)"),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextAwareAttentionPooling(16, **kwargs)


def published_tap(tap, x_audio, x_text, attn_mask=None):
    """The published TextAwareAttentionPooling.forward (eval), transcribed: one LayerNorm for all three uses."""
    norm = tap.output_norm
    q_t = tap.query(norm(x_text))
    k_a = tap.key(norm(x_audio))
    v_a = tap.value(norm(x_audio))
    return norm(tap.output(F.scaled_dot_product_attention(q_t, k_a, v_a, attn_mask=attn_mask)))


def test_shared_norm_tap_equals_the_published_formula_on_padded_windows():
    tap = make_tap()  # shared_norm=True: make_tap's random affine parameters land on the one LayerNorm
    assert tap.text_norm is tap.window_norm is tap.output_norm
    text, windows, mask = make_inputs()
    text = text * 3.0  # unnormalised, as the projection hands it over
    windows = windows + 5.0 * (~mask).unsqueeze(-1)  # garbage in padding must not matter
    with torch.no_grad():
        scores = tap.score(text, windows, mask)
        sentence = text.unsqueeze(1)  # (captions, 1, width)
        expected = torch.empty_like(scores)
        for clip in range(len(windows)):  # the published per-clip loop of rank_sequences
            conditioned = published_tap(tap, windows[clip:clip + 1], sentence, mask[clip:clip + 1].unsqueeze(0))
            expected[:, clip] = (F.normalize(conditioned, dim=-1) * F.normalize(sentence, dim=-1)).sum(-1)[:, 0]
    torch.testing.assert_close(scores, expected)


def test_separate_norms_are_an_option_with_their_own_parameters():
    tap = TextAwareAttentionPooling(16, dim=8, shared_norm=False)
    assert len({id(tap.text_norm), id(tap.window_norm), id(tap.output_norm)}) == 3
    shared = TextAwareAttentionPooling(16, dim=8)
    assert sum(p.numel() for p in tap.parameters()) - sum(p.numel() for p in shared.parameters()) == 4 * 16


def make_own_caption(**kwargs):
    torch.manual_seed(0)
    pooling = OwnCaptionAttentionPooling(16, dim=8, **kwargs).double()
    with torch.no_grad():
        pooling.output_norm.weight.uniform_(0.5, 1.5)
        pooling.output_norm.bias.uniform_(-0.3, 0.3)
    return pooling.eval()


def published_own_caption_scores(pooling, text, windows, pooling_text):
    """Published forward + rank_sequences (commits b9dc5ae-a78f3bc): clip i pooled by pooling_text[i], no mask."""
    conditioned = published_tap(pooling, windows, pooling_text.unsqueeze(1))  # (clips, 1, width)
    return F.normalize(text, dim=-1) @ F.normalize(conditioned[:, 0], dim=-1).t()


def test_own_caption_training_pools_each_clip_with_its_own_caption_over_every_window():
    pooling = make_own_caption()
    text, windows, mask = make_inputs(captions=5)
    with torch.no_grad():
        scores = pooling.score(text * 2.0, windows, mask)
        torch.testing.assert_close(scores, published_own_caption_scores(pooling, text * 2.0, windows, text * 2.0))
        # no mask: the windows marked as padding change the scores, the mask itself does not
        assert torch.equal(scores, pooling.score(text * 2.0, windows, torch.ones_like(mask)))
        assert not torch.allclose(scores, pooling.score(text * 2.0, windows + torch.randn_like(windows) * (~mask).unsqueeze(-1), mask))
    with pytest.raises(ValueError, match="one caption per clip"):
        pooling.score(text[:3], windows, mask)


def test_own_caption_evaluation_pools_every_clip_with_its_first_ground_truth_caption():
    pooling = make_own_caption()
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(10, 16, generator=generator, dtype=torch.float64)
    _, windows, mask = make_inputs(captions=1)
    caption_clip = torch.tensor([3, 0, 1, 0, 2, 4, 3, 1, 2, 4])  # first captions: rows 1, 2, 4, 0, 5
    with torch.no_grad():
        scores = pooling.rank_split(text, windows, mask, caption_clip)
        first = text[torch.tensor([1, 2, 4, 0, 5])]
        torch.testing.assert_close(scores, published_own_caption_scores(pooling, text, windows, first))
        # the leak: which true caption pools the clip decides its embedding
        swapped = torch.tensor([0, 3, 1, 0, 2, 4, 3, 1, 2, 4])  # clips 0 and 3 now pooled by rows 0 and 1
        assert not torch.allclose(scores, pooling.rank_split(text, windows, mask, swapped))


class FixedWeightDropout(torch.nn.Module):
    """Attention-weight dropout with a chosen outcome: zero some weights, rescale the rest."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.scale = scale

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        return weights * self.scale


def test_training_with_attention_weight_dropout_keeps_the_output_bias_as_published():
    # A clip with one real window whose weight is dropped pools to the output projection's bias (published:
    # w_0(dropout(softmax) @ V)), not to a zero vector that LayerNorm cannot normalise.
    tap = make_tap(p_dropout_weights=0.5, p_dropout_proj=0.0).train()
    text, windows, mask = make_inputs()
    scale = torch.where(torch.rand(len(text), len(windows), windows.shape[1],
                                   generator=torch.Generator().manual_seed(3)) < 0.5, 0.0, 2.0).double()
    scale[:, 1] = 0.0  # clip 1 has a single real window: its whole attention is dropped
    tap.weight_dropout = FixedWeightDropout(scale)
    with torch.no_grad():
        pooled = tap(text, windows, mask)
        weights = torch.einsum("cd,awd->caw", tap.query(tap.output_norm(text)),
                               tap.key(tap.output_norm(windows))) / math.sqrt(8)
        weights = weights.masked_fill(~mask.unsqueeze(0), float("-inf")).softmax(-1) * scale
        attended = torch.einsum("caw,awd->cad", weights, tap.value(tap.output_norm(windows)))
        expected = F.normalize(tap.output_norm(tap.output(attended)), dim=-1)
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(pooled[:, 1], F.normalize(tap.output_norm(tap.output.bias), dim=-1).expand(7, -1))


def test_mean_initialisation_starts_as_mean_pooling_of_the_normalised_windows():
    tap = TextAwareAttentionPooling(16, dim=16, init="mean").double().eval()
    text, windows, mask = make_inputs()
    with torch.no_grad():
        expected = F.normalize(tap.output_norm(masked_mean(tap.output_norm(windows), mask) + tap.output.bias),
                               dim=-1)
        torch.testing.assert_close(tap(text, windows, mask), expected.unsqueeze(0).expand(len(text), -1, -1))
        torch.testing.assert_close(tap.score(text, windows, mask), F.normalize(text, dim=-1) @ expected.t())
    with pytest.raises(ValueError, match="tap_hyperparams.init='zeros' is not one of random, mean"):
        TextAwareAttentionPooling(16, init="zeros")
