import pytest
import torch

from models.audio.passt import PasstEncoder, mel_frames
from models.audio.windowing import split_into_windows, window_count
from models.pooling import masked_mean


def test_window_count_and_padding_mask():
    assert window_count(30, 10, 10) == 3
    assert window_count(30, 10, 5) == 5
    assert window_count(32, 10, 10) == 4  # last window runs past the clip: padded
    audio = torch.arange(2 * 30, dtype=torch.float32).view(2, 30)
    windows, mask = split_into_windows(audio, torch.tensor([30, 12]), 10, 10)
    assert windows.shape == (2, 3, 10)
    assert torch.equal(windows[0, 1], audio[0, 10:20])
    assert mask.tolist() == [[True, True, True], [True, True, False]]


def test_short_clip_keeps_its_first_window():
    _, mask = split_into_windows(torch.zeros(1, 30), torch.tensor([0]), 10, 5)
    assert mask.tolist() == [[True, False, False, False, False]]


def test_window_errors():
    with pytest.raises(ValueError, match="longer than the clip"):
        window_count(10, 20, 5)


def test_masked_mean_ignores_padded_windows():
    windows = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    assert masked_mean(windows, torch.tensor([[True, True, False]])).tolist() == [[2.0, 2.0]]


@pytest.fixture(scope="module")
def small_encoder():
    torch.manual_seed(0)
    return PasstEncoder("passt_small", window_seconds=2, hop_seconds=2, pretrained=False, freqm=0, timem=0).eval()


def test_encoder_skips_padding_and_matches_window_by_window(small_encoder):
    sample_rate = 32000
    audio = torch.randn(2, 6 * sample_rate) * 0.1
    audio[1, 3 * sample_rate:] = 0
    lengths = torch.tensor([6 * sample_rate, 3 * sample_rate])
    with torch.no_grad():
        sequence, mask = small_encoder(audio, lengths)
        direct = small_encoder.embed_windows(audio[1, 2 * sample_rate:4 * sample_rate].unsqueeze(0))
    assert sequence.shape == (2, 3, small_encoder.output_size)
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    assert torch.all(sequence[1, 2] == 0)
    torch.testing.assert_close(sequence[1, 1], direct[0], atol=1e-5, rtol=1e-4)


def test_unknown_model_and_window_too_long_for_weights():
    with pytest.raises(ValueError, match="choices: passt, passt_small"):
        PasstEncoder("cnn14")
    with pytest.raises(ValueError, match=r"segment_length=12 s must be in \(0, 10.0\]"):
        PasstEncoder("passt", window_seconds=12, pretrained=False)
    with pytest.raises(ValueError, match="has no pretrained weights"):
        PasstEncoder("passt_small", pretrained=True)


def test_published_passt_architecture_builds_with_random_weights():
    encoder = PasstEncoder("passt", window_seconds=10, pretrained=False, s_patchout_t=15, s_patchout_f=2)
    assert encoder.output_size == 768
    assert sum(p.numel() for p in encoder.parameters()) > 85_000_000
    assert encoder.network.time_new_pos_embed.shape[-1] == 99  # 10 s windows fit the AudioSet positions
    assert mel_frames(10 * 32000) == 1000


def test_frozen_encoder_stays_in_eval_mode_without_gradients():
    encoder = PasstEncoder("passt_small", window_seconds=2, pretrained=False, frozen=True).train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
