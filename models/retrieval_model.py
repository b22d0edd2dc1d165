"""The two towers, their heads and the pooling, assembled into one caption-clip scorer."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.heads import projection_head

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs


class RetrievalModel(nn.Module):
    """Scores captions against clips in a shared space.

    Clips stay sequences of projected window embeddings until `score`, where the pooling decides
    how a caption sees a clip (the same mean for every caption, or attention conditioned on it).
    """

    def __init__(self, audio_encoder: nn.Module, text_encoder: nn.Module, pooling: nn.Module,
                 shared_representation_size: int, text_projection: str = "linear", initial_tau: float = 0.05,
                 freeze_tau: bool = False):
        super().__init__()
        if initial_tau <= 0:
            raise ValueError(f"initial_tau={initial_tau} must be positive")
        self.audio_encoder = audio_encoder
        self.text_encoder = text_encoder
        self.audio_projection = projection_head(audio_encoder.output_size, shared_representation_size)
        self.text_projection = projection_head(text_encoder.output_size, shared_representation_size, text_projection)
        self.pooling = pooling
        self.tau = nn.Parameter(torch.tensor(float(initial_tau)), requires_grad=not freeze_tau)
        self.compiled = False  # set by compile_encoders: then a batch of a new shape costs a compilation

    def encode_audio(self, audio: torch.Tensor, audio_length: torch.Tensor, real_windows: int | None = None,
                     pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, samples) -> projected windows (batch, windows, shared) and their mask (batch, windows).
        `real_windows`: the audio encoder's `real_window_count` of the batch, where known. `pad_to`: clips the
        encoder sees, silent ones of length 0 added (the same result: clips are embedded independently)."""
        clips = audio.shape[0]
        padding = max(0, (pad_to or 0) - clips)
        if padding:
            audio = torch.cat((audio, audio.new_zeros(padding, audio.shape[1])))
            audio_length = torch.cat((audio_length, audio_length.new_zeros(padding)))
            if real_windows is not None:  # the silent clips' windows too (an empty clip keeps its first), on the host
                real_windows += self.audio_encoder.real_window_count(audio.shape[1],
                                                                     torch.zeros(padding, dtype=torch.long))
        windows, mask = self.audio_encoder(audio, audio_length, real_windows)
        if padding:
            windows, mask = windows[:clips], mask[:clips]
        return self.audio_projection(windows), mask

    def encode_text(self, captions: list[str], pad_to: int | None = None) -> torch.Tensor:
        """captions -> (captions, shared). `pad_to`: captions the encoder sees, empty ones added (the same result)."""
        padding = max(0, (pad_to or 0) - len(captions))
        if not padding:
            return self.text_projection(self.text_encoder(captions))
        return self.text_projection(self.text_encoder(captions + [""] * padding)[:len(captions)])

    def encode_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """The text encoder's tokens, already on the device -> (captions, shared)."""
        return self.text_projection(self.text_encoder.embed_tokens(tokens))

    def score(self, text: torch.Tensor, windows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Similarity logits (captions, clips), divided by the temperature."""
        return self.pooling.score(text, windows, mask) / self.temperature()

    def shard_scores(self, text: torch.Tensor, windows: torch.Tensor, mask: torch.Tensor,
                     own: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """`Pooling.shard_scores` as logits: (own captions, all clips), (all captions, own clips)."""
        caption_scores, clip_scores = self.pooling.shard_scores(text, windows, mask, own)
        return caption_scores / self.temperature(), clip_scores / self.temperature()

    def compile_encoders(self, backend: str | Callable = "inductor", mode: str = "default") -> None:
        """torch.compile the two transformers in place (their state-dict keys stay as they are). `reduce-overhead`
        replays CUDA graphs, which pays only where every step has the same shapes (README, "Training speed")."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode={mode!r} is not one of {', '.join(COMPILE_MODES)}")
        self.audio_encoder.compile_transformer(backend, mode)
        self.text_encoder.compile_transformer(backend, mode)
        self.compiled = True

    def temperature(self) -> torch.Tensor:
        return self.tau.clamp(min=1e-4)
