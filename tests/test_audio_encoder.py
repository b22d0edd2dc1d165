import pytest
import torch
import torch.nn.functional as F
import torchaudio
from hear21passt.models.preprocess import AugmentMelSTFT

from models.audio.mel import MelSTFT, mel_filter_bank
from models.audio.passt import MEL_SETTINGS, PasstEncoder, ScaledDotProductAttention, mel_frames
from models.audio.windowing import padded_length, split_into_windows, window_count
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


@pytest.mark.parametrize("crop, window, hop", [(12, 10, 5), (12, 10, 10), (5, 5, 5), (7, 10, 10), (13, 4, 3),
                                               (9, 3, 1), (10, 10, 4)])
def test_crops_padded_to_their_padded_length_have_the_real_windows_of_the_whole_clip(crop, window, hop):
    length = padded_length(crop, window, hop)
    audio = torch.arange(1, 1 + crop, dtype=torch.float32).repeat(3, 1)
    lengths = torch.tensor([crop, crop - 1, 1])
    audio[1, crop - 1:], audio[2, 1:] = 0, 0
    short_windows, short_mask = split_into_windows(F.pad(audio, (0, length - crop)), lengths, window, hop)
    long_windows, long_mask = split_into_windows(F.pad(audio, (0, 60 - crop)), lengths, window, hop)
    count = short_mask.shape[1]
    assert count == window_count(length, window, hop) and not long_mask[:, count:].any()
    assert torch.equal(short_mask, long_mask[:, :count]) and torch.equal(short_windows, long_windows[:, :count])
    assert short_mask[0].all()  # the shortest such length: even its last window starts inside the crop


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


def test_padding_windows_are_embedded_when_the_pooling_attends_to_them():
    torch.manual_seed(0)
    encoder = PasstEncoder("passt_small", window_seconds=2, hop_seconds=2, pretrained=False,
                           embed_padding_windows=True).eval()
    audio = torch.zeros(1, 6 * 32000)
    audio[0, :32000] = torch.randn(32000) * 0.1
    with torch.no_grad():
        sequence, mask = encoder(audio, torch.tensor([32000]))
        silence = encoder.embed_windows(torch.zeros(1, 2 * 32000))
    assert mask.tolist() == [[True, False, False]]  # the mask still says which windows hold audio
    torch.testing.assert_close(sequence[0, 2], silence[0], atol=1e-5, rtol=1e-4)
    assert sequence[0, 2].abs().sum() > 0


@pytest.mark.parametrize("model, arch, stride, input_frames, tokens", [
    ("passt", "passt_s_p16_s16_128_ap468", 16, 1000, (8, 62)),
    ("passt_s", "passt_s_kd_p16_128_ap486", 10, 998, (12, 99)),
    ("passt_s_swa", "passt_s_swa_p16_128_ap476", 10, 998, (12, 99)),
])
def test_published_names_build_their_published_checkpoints_and_strides(model, arch, stride, input_frames, tokens,
                                                                        monkeypatch):
    from hear21passt.models import passt as hear21passt_models
    requested = {}
    original = hear21passt_models.get_model

    def spy(**settings):
        requested.update(settings)
        return original(**{**settings, "pretrained": False})  # no download here; the call is what is checked

    monkeypatch.setattr(hear21passt_models, "get_model", spy)
    encoder = PasstEncoder(model, window_seconds=10, pretrained=True)
    assert (requested["arch"], requested["fstride"], requested["tstride"], requested["input_tdim"],
            requested["pretrained"]) == (arch, stride, stride, input_frames, True)
    assert encoder.network.patch_embed.proj.stride == (stride, stride)
    grid = (encoder.network.freq_new_pos_embed.shape[2], encoder.network.time_new_pos_embed.shape[3])
    assert grid == tokens  # stride 16: 496 tokens per 10 s window, stride 10: 1188 (2.4x)


def test_unknown_model_and_window_too_long_for_weights():
    with pytest.raises(ValueError, match="choices: passt, passt_s, passt_s_swa, passt_small"):
        PasstEncoder("cnn14")
    with pytest.raises(ValueError, match=r"segment_length=12 s must be in \(0, 10.0\]"):
        PasstEncoder("passt", window_seconds=12, pretrained=False)
    with pytest.raises(ValueError, match="has no pretrained weights"):
        PasstEncoder("passt_small", pretrained=True)


def test_published_passt_architecture_builds_with_random_weights():
    encoder = PasstEncoder("passt", window_seconds=10, pretrained=False, s_patchout_t=15, s_patchout_f=2)
    assert encoder.output_size == 768
    assert sum(p.numel() for p in encoder.parameters()) > 85_000_000
    assert encoder.network.time_new_pos_embed.shape[-1] == 62  # 10 s windows fit the AudioSet positions (stride 16)
    assert mel_frames(10 * 32000) == 1000


def test_frozen_encoder_stays_in_eval_mode_without_gradients():
    encoder = PasstEncoder("passt_small", window_seconds=2, pretrained=False, frozen=True).train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


@pytest.mark.parametrize("model, seconds", [("passt", 10), ("passt_small", 4)])
def test_sdpa_attention_equals_hear21passts_own_attention_on_the_same_weights(model, seconds):
    torch.manual_seed(0)
    explicit = PasstEncoder(model, window_seconds=seconds, pretrained=False, attention="explicit").eval()
    assert type(explicit.network.blocks[0].attn).__module__ == "hear21passt.models.passt"
    fused = PasstEncoder(model, window_seconds=seconds, pretrained=False, attention="sdpa").eval()
    fused.load_state_dict(explicit.state_dict())  # strict: the same weights under the same keys
    assert isinstance(fused.network.blocks[0].attn, ScaledDotProductAttention)
    audio = torch.randn(2, seconds * 32000) * 0.1
    with torch.no_grad():
        difference = (fused.embed_windows(audio) - explicit.embed_windows(audio)).abs().max()
    assert difference < 1e-5


def test_attention_choice_is_checked():
    with pytest.raises(ValueError, match=r"audio_features.attention='flash' is not one of sdpa, explicit"):
        PasstEncoder("passt_small", window_seconds=2, pretrained=False, attention="flash")


def test_embedding_all_windows_changes_nothing_at_the_real_ones(small_encoder):
    audio = torch.randn(3, 6 * 32000) * 0.1
    lengths = torch.tensor([6 * 32000, 3 * 32000, 32000])
    with torch.no_grad():
        selected, mask = small_encoder(audio, lengths)
        small_encoder.embed_padding_windows = True
        everything, same_mask = small_encoder(audio, lengths)
        small_encoder.embed_padding_windows = False
    assert torch.equal(mask, same_mask) and mask.sum() == 6
    torch.testing.assert_close(everything[mask], selected[mask], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(masked_mean(everything, mask), masked_mean(selected, mask), atol=1e-5, rtol=1e-4)


def test_real_windows_counted_on_the_host_pick_the_same_windows_with_the_same_gradients():
    """Training mode (patchout and band edges drawn in the same order): the same embeddings and gradients to the bit
    as selecting the windows by the mask, which makes a GPU tell the host how many there are."""
    settings = dict(window_seconds=2, hop_seconds=1, pretrained=False, s_patchout_t=2, s_patchout_f=1)
    torch.manual_seed(0)
    encoder = PasstEncoder("passt_small", **settings).train()
    audio, lengths = torch.randn(3, 6 * 32000) * 0.1, torch.tensor([6 * 32000, 2 * 32000 + 5, 0])
    count = encoder.real_window_count(audio.shape[1], lengths)
    assert count == 5 + 3 + 1  # a window starts every second inside the audio; an empty clip keeps its first
    results = []
    for real_windows in (None, count):
        torch.manual_seed(1)
        sequence, mask = encoder(audio, lengths, real_windows)
        (sequence * torch.linspace(-1, 1, sequence.numel()).view_as(sequence)).sum().backward()
        results.append((sequence.detach(), mask, {name: p.grad.clone() for name, p in encoder.named_parameters()}))
        encoder.zero_grad(set_to_none=True)
    (by_mask, mask, mask_gradients), (by_count, same_mask, count_gradients) = results
    assert torch.equal(by_count, by_mask) and torch.equal(same_mask, mask) and int(mask.sum()) == count
    assert by_count[~mask].abs().sum() == 0
    assert all(torch.equal(count_gradients[name], mask_gradients[name]) for name in mask_gradients)
    with pytest.raises(RuntimeError, match="real_windows=8 differs from the mask's count"):
        encoder(audio, lengths, 8)


@pytest.mark.parametrize("low_hz, high_hz", [(0.0, 15000.0), (9.0, 16000.0), (4.0, 14001.0)])
def test_mel_filter_bank_is_kaldis_with_hear21passts_nyquist_column(low_hz, high_hz):
    kaldi, _ = torchaudio.compliance.kaldi.get_mel_banks(128, 1024, 32000, low_hz, high_hz, vtln_low=100.0,
                                                         vtln_high=-500.0, vtln_warp_factor=1.0)
    ours = mel_filter_bank(128, 1024, 32000, torch.tensor(low_hz), torch.tensor(high_hz))
    assert ours.shape == (128, 513) and not ours[:, -1].any()
    assert (ours[:, :-1] - kaldi).abs().max() < 1e-5


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
@pytest.mark.parametrize("training", [True, False])
def test_our_front_end_is_hear21passts_and_draws_the_same_numbers(training, precision):
    """Same input, same seed: the same log-mel energies (pre-emphasis, band edges, SpecAugment masks), and the host's
    generator left in the same state, so everything drawn after it (patchout, data order) stays the published
    stream, evaluation included. Under autocast hear21passt's pre-emphasis runs in bf16, and so does ours."""
    published = AugmentMelSTFT(freqm=8, timem=20, **MEL_SETTINGS).train(training)
    ours = MelSTFT(freqm=8, timem=20, **MEL_SETTINGS).train(training)
    audio = torch.randn(3, 5 * 32000) * 0.1
    outputs, next_draws = [], []
    for front_end in (published, ours):
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            outputs.append(front_end(audio))
        next_draws.append(torch.rand(4))
    assert outputs[1].dtype == outputs[0].dtype
    # Equal to the bit on CPU-2; the tolerance leaves another CPU's rounding one step (bf16's is 1.6e-2 here).
    tolerance = 1e-6 if precision == "32" else 1.6e-2
    torch.testing.assert_close(outputs[1], outputs[0], atol=tolerance, rtol=0)
    assert torch.equal(next_draws[0], next_draws[1])


@pytest.mark.parametrize("training", [True, False])
def test_augmenting_on_the_device_computes_hear21passts_front_end_and_patchout(training):
    """Random band edges, SpecAugment masks and structured patchout: on a CPU, the same draws from the same
    generator, so a seeded forward pass equals hear21passt's own (its front end and `forward_features`)."""
    settings = dict(window_seconds=10, pretrained=False, s_patchout_t=3, s_patchout_f=1, freqm=8, timem=20)
    torch.manual_seed(0)
    published = PasstEncoder("passt_small", **settings).train(training)
    published.mel = AugmentMelSTFT(freqm=8, timem=20, **MEL_SETTINGS).train(training)
    published._token_features = published.network.forward_features
    on_device = PasstEncoder("passt_small", augment_on_device=True, **settings).train(training)
    default = PasstEncoder("passt_small", **settings).train(training)
    on_device.load_state_dict(published.state_dict())  # strict: no new weights
    default.load_state_dict(published.state_dict())
    audio, lengths = torch.randn(2, 25 * 32000) * 0.1, torch.tensor([25, 12]) * 32000
    outputs = []
    for encoder in (published, on_device, default):
        torch.manual_seed(1)
        outputs.append(encoder(audio, lengths)[0])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[2], outputs[0], atol=1e-5, rtol=1e-5)
    torch.manual_seed(2)
    assert training == (on_device(audio, lengths)[0] - outputs[1]).abs().gt(1e-3).any()  # other draws, other result
