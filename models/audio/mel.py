"""PaSST's log-mel front end with every step on the audio's device.

hear21passt's `AugmentMelSTFT` draws the random band edges of each batch with `.item()` and builds the mel filter
bank on the CPU in every forward pass, evaluation included, then copies it to the GPU: a copy from pageable memory
waits for all work queued before it, so the host cannot run ahead of the GPU. `DeviceMelSTFT` computes the same
function with the band edges drawn on the device, the filter bank built there, and the evaluation bank kept.
"""
from __future__ import annotations

import contextlib

import torch
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


class DeviceMelSTFT(AugmentMelSTFT):
    """`AugmentMelSTFT` (same settings, same buffers and masks) without host work in its forward pass.

    On a CPU it draws the band edges from the same generator in the same order as hear21passt, so a seeded run
    computes exactly what the published front end computes; on a GPU the draws come from the GPU's generator."""

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

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """(n, samples) -> (n, mel_bins, frames), normalised log-mel energies."""
        emphasised = torch.nn.functional.conv1d(audio.unsqueeze(1), self.preemphasis_coefficient).squeeze(1)
        spectrum = torch.stft(emphasised, self.n_fft, hop_length=self.hopsize, win_length=self.win_length,
                              center=True, normalized=False, window=self.window, return_complex=True)
        power = spectrum.real ** 2 + spectrum.imag ** 2
        # As hear21passt: the filter bank product stays in float32 under CUDA autocast.
        with torch.autocast("cuda", enabled=False) if audio.is_cuda else contextlib.nullcontext():
            mel = torch.matmul(self.filter_bank(audio.device), power)
        mel = (mel + 1e-5).log()
        if self.training:
            mel = self.timem(self.freqm(mel))
        return (mel + 4.5) / 5.0
