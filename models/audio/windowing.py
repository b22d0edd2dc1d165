"""Cutting padded clips into fixed-length windows for an encoder with a bounded input length."""
from __future__ import annotations

import torch


def window_count(clip_samples: int, window_samples: int, hop_samples: int) -> int:
    """Number of windows that cover a padded clip of `clip_samples` (the last may be partly padding)."""
    if window_samples <= 0 or hop_samples <= 0:
        raise ValueError(f"window ({window_samples}) and hop ({hop_samples}) must be positive sample counts")
    if window_samples > clip_samples:
        raise ValueError(f"window of {window_samples} samples is longer than the clip ({clip_samples} samples)")
    return (clip_samples - window_samples + hop_samples - 1) // hop_samples + 1


def padded_length(samples: int, window_samples: int, hop_samples: int) -> int:
    """The shortest padded length whose windows include, whole, every window that starts inside `samples`: audio of
    at most `samples` padded to it gives the same real windows (and so the same masked pooling) as padded further."""
    starts_inside = -(-samples // hop_samples)
    return (starts_inside - 1) * hop_samples + window_samples


def split_into_windows(audio: torch.Tensor, audio_length: torch.Tensor, window_samples: int,
                       hop_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of every clip and which of them hold real audio.

    audio: (batch, samples), zero-padded; audio_length: (batch,) real samples per clip.
    Returns windows (batch, windows, window_samples) and mask (batch, windows), True where the
    window starts inside the real audio. A clip shorter than one window still gets its first window.
    """
    samples = audio.shape[1]
    needed = (window_count(samples, window_samples, hop_samples) - 1) * hop_samples + window_samples
    if needed > samples:
        audio = torch.nn.functional.pad(audio, (0, needed - samples))
    return audio.unfold(1, window_samples, hop_samples), window_mask(audio_length, samples, window_samples,
                                                                      hop_samples)


def window_mask(audio_length: torch.Tensor, samples: int, window_samples: int, hop_samples: int) -> torch.Tensor:
    """(batch, windows): True where a window of clips padded to `samples` starts inside the real audio."""
    starts = torch.arange(window_count(samples, window_samples, hop_samples), device=audio_length.device)
    return starts.unsqueeze(0) * hop_samples < audio_length.clamp(min=1).unsqueeze(1)


def real_window_rows(mask: torch.Tensor, real_windows: int) -> torch.Tensor:
    """The flat row numbers of the mask's True entries, in order, for a count known on the host: unlike
    `mask.nonzero()`, whose size the host must read back from the GPU, this sizes nothing by the mask's values."""
    flat = mask.flatten()
    torch._assert_async(flat.sum() == real_windows, f"real_windows={real_windows} differs from the mask's count")
    return (~flat).to(torch.uint8).argsort(stable=True)[:real_windows]
