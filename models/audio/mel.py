"""PaSST's log-mel front end: hear21passt's function, computed faster, and optionally with every step on the device.

`MelSTFT` is hear21passt's `AugmentMelSTFT` (same settings, buffers, random draws and filter bank) with its two slow
steps on a CPU replaced by equal ones: the pre-emphasis (`preemphasis`) and the power spectrum of the complex STFT
instead of its deprecated real view (2.1-2.3x faster on 2 CPU cores: benchmarks/RESULTS.md).

hear21passt draws the random band edges of each batch with `.item()` and builds the mel filter bank on the CPU in
every forward pass, evaluation included, then copies it to the GPU: a copy from pageable memory waits for all work
queued before it, so the host cannot run ahead of the GPU. `DeviceMelSTFT` computes the same function with the band
edges drawn on the device, the filter bank built there, and the evaluation bank kept.
"""
from __future__ import annotations

import contextlib

import torch
import torchaudio
from hear21passt.models.preprocess import AugmentMelSTFT


def kaldi_mel(frequency: torch.Tensor) -> torch.Tensor:
    return 1127.0 * (1.0 + frequency / 700.0).log()


def mel_filter_bank(mel_bins: int, fft_size: int, sample_rate: int, low_hz: torch.Tensor,
                    high_hz: torch.Tensor) -> torch.Tensor:
    """(mel_bins, fft_size // 2 + 1) triangular filters evenly spaced on Kaldi's mel scale from low_hz to high_hz.

    The function of torchaudio's `kaldi.get_mel_banks` (no VTLN) with hear21passt's zero column for the Nyquist
    bin, but the edges are 0-d tensors, so random edges never leave the device."""
    low_mel, high_mel = kaldi_mel(low_hz), kaldi_mel(high_hz)
    step = (high_mel - low_mel) / (mel_bins + 1)
    band = torch.arange(mel_bins, device=low_hz.device, dtype=torch.float32).unsqueeze(1)
    left, centre, right = low_mel + band * step, low_mel + (band + 1) * step, low_mel + (band + 2) * step
    bin_hz = torch.arange(fft_size // 2, device=low_hz.device, dtype=torch.float32) * (sample_rate / fft_size)
    mel = kaldi_mel(bin_hz).unsqueeze(0)
    rising, falling = (mel - left) / (centre - left), (right - mel) / (right - centre)
    bank = torch.minimum(rising, falling).clamp(min=0.0)
    return torch.nn.functional.pad(bank, (0, 1))


def preemphasis(audio: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """hear21passt's pre-emphasis y[t] = x[t + 1] - 0.97 x[t]: its two-tap conv1d (`kernel` (1, 1, 2)) is slow on
    CPUs (about 100 ms for 32 windows of 5 s on 2 cores) and equals this difference of shifted views (4-15 ms). Under
    autocast the conv1d runs in half precision, which only the conv1d itself reproduces."""
    device_type = audio.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.nn.functional.conv1d(audio.unsqueeze(1), kernel).squeeze(1)
    return audio[:, 1:] + kernel[0, 0, 0] * audio[:, :-1]


class MelSTFT(AugmentMelSTFT):
    """`AugmentMelSTFT` (same settings, buffers and masks), the same function from the same random draws: on a CPU
    equal to hear21passt's own to the bit."""

    def filter_bank(self, device: torch.device) -> torch.Tensor:
        # hear21passt's draws, from the host's generator in every pass (evaluation included, so the random stream of
        # a seeded run stays the published one), and its filter bank, built on the host and copied over.
        low = self.fmin + torch.randint(self.fmin_aug_range, (1,)).item()
        high = self.fmax + self.fmax_aug_range // 2 - torch.randint(self.fmax_aug_range, (1,)).item()
        if not self.training:
            low, high = self.fmin, self.fmax
        bank, _ = torchaudio.compliance.kaldi.get_mel_banks(self.n_mels, self.n_fft, self.sr, low, high,
                                                            vtln_low=100.0, vtln_high=-500.0, vtln_warp_factor=1.0)
        return torch.nn.functional.pad(bank, (0, 1)).to(device)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """(n, samples) -> (n, mel_bins, frames), normalised log-mel energies."""
        spectrum = torch.stft(preemphasis(audio, self.preemphasis_coefficient), self.n_fft, hop_length=self.hopsize,
                              win_length=self.win_length, center=True, normalized=False, window=self.window,
                              return_complex=True)
        power = spectrum.real ** 2 + spectrum.imag ** 2
        # As hear21passt: the filter bank product stays in float32 under CUDA autocast.
        with torch.autocast("cuda", enabled=False) if audio.is_cuda else contextlib.nullcontext():
            mel = torch.matmul(self.filter_bank(audio.device), power)
        mel = (mel + 1e-5).log()
        if self.training:
            mel = self.timem(self.freqm(mel))
        return (mel + 4.5) / 5.0


class DeviceMelSTFT(MelSTFT):
    """`MelSTFT` without host work in its forward pass.

    On a CPU it draws the training band edges from the same generator in the same order as hear21passt, so a seeded
    training pass computes exactly what the published front end computes; on a GPU the draws come from the GPU's
    generator. Evaluation draws nothing (hear21passt draws and discards two numbers there)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._evaluation_bank: torch.Tensor | None = None

    def filter_bank(self, device: torch.device) -> torch.Tensor:
        if self.training:
            low = self.fmin + torch.randint(self.fmin_aug_range, (1,), device=device)[0]
            high = self.fmax + self.fmax_aug_range // 2 - torch.randint(self.fmax_aug_range, (1,), device=device)[0]
            return mel_filter_bank(self.n_mels, self.n_fft, self.sr, low.float(), high.float())
        if self._evaluation_bank is None or self._evaluation_bank.device != device:
            edges = torch.tensor([self.fmin, self.fmax], dtype=torch.float32, device=device)
            self._evaluation_bank = mel_filter_bank(self.n_mels, self.n_fft, self.sr, edges[0], edges[1])
        return self._evaluation_bank
