"""PaSST (hear21passt) applied window by window to 32 kHz clips."""
from __future__ import annotations

import contextlib
import io
import urllib.error
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from hear21passt.models import passt as hear21passt_models
from torch import nn

from models.audio.mel import DeviceMelSTFT, MelSTFT
from models.audio.windowing import real_window_rows, split_into_windows, window_mask

# hear21passt warns when a window is shorter than the AudioSet positional grid (expected here); the message
# says nothing actionable to our users.
warnings.filterwarnings("ignore", message="Input image size")

SAMPLE_RATE = 32000
MEL_HOP_SAMPLES = 320
MEL_BINS = 128
ATTENTION_IMPLEMENTATIONS = ("sdpa", "explicit")
# hear21passt's log-mel settings for its AudioSet models: 25 ms windows, 10 ms hop, random band edges in training.
MEL_SETTINGS = dict(n_mels=MEL_BINS, sr=SAMPLE_RATE, win_length=800, hopsize=MEL_HOP_SAMPLES, n_fft=1024, htk=False,
                    fmin=0.0, fmax=None, norm=1, fmin_aug_range=10, fmax_aug_range=2000)


@dataclass(frozen=True)
class PasstVariant:
    """One selectable PaSST configuration; `arch` set means hear21passt's downloadable AudioSet weights,
    built for `input_frames` spectrogram frames (the length of their positional grid)."""
    embed_dim: int
    depth: int
    num_heads: int
    patch_stride: int
    max_window_seconds: float
    arch: str | None = None
    input_frames: int = 998


PASST_VARIANTS = {
    # The published names map to the published checkpoints and strides (salsa / PR-Text-To-Audio-Retrieval):
    # `passt` is PaSST-S without patch overlap (stride 16: 8 x 62 tokens per 10 s window, mAP .468),
    "passt": PasstVariant(embed_dim=768, depth=12, num_heads=12, patch_stride=16, max_window_seconds=10.0,
                          arch="passt_s_p16_s16_128_ap468", input_frames=1000),
    # `passt_s` the overlapping, knowledge-distilled PaSST-S (stride 10: 12 x 99 tokens, about 2.4x more, mAP .486).
    "passt_s": PasstVariant(embed_dim=768, depth=12, num_heads=12, patch_stride=10, max_window_seconds=10.0,
                            arch="passt_s_kd_p16_128_ap486"),
    # Not used by the published systems: the SWA PaSST-S of hear21passt's own default (stride 10, mAP .476).
    "passt_s_swa": PasstVariant(embed_dim=768, depth=12, num_heads=12, patch_stride=10, max_window_seconds=10.0,
                                arch="passt_s_swa_p16_128_ap476"),
    # Same architecture, narrow and shallow, random init: for CPUs, demos and tests.
    "passt_small": PasstVariant(embed_dim=96, depth=2, num_heads=4, patch_stride=16, max_window_seconds=30.0),
}


def check_model_name(model: str) -> PasstVariant:
    if model not in PASST_VARIANTS:
        raise ValueError(f"audio_features.model={model!r} is unknown; choices: {', '.join(PASST_VARIANTS)}")
    return PASST_VARIANTS[model]


def pretrained_weights_path(model: str) -> Path | None:
    """Where hear21passt caches the model's weights (torch hub's checkpoints folder); None if it has none."""
    variant = check_model_name(model)
    if variant.arch is None:
        return None
    url = hear21passt_models.default_cfgs[variant.arch]["url"]
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def mel_frames(window_samples: int) -> int:
    """Spectrogram frames hear21passt's front end yields for one window (pre-emphasis drops a sample)."""
    return (window_samples - 1) // MEL_HOP_SAMPLES + 1


class ScaledDotProductAttention(nn.Module):
    """hear21passt's self-attention computed by `F.scaled_dot_product_attention`: the same function of the same
    weights (the state-dict keys do not change), but GPUs run it with flash or memory-efficient kernels instead of
    materialising the (tokens x tokens) score matrix of every head."""

    def __init__(self, explicit: nn.Module):
        super().__init__()
        self.num_heads = explicit.num_heads
        self.qkv, self.attn_drop, self.proj, self.proj_drop = explicit.qkv, explicit.attn_drop, explicit.proj, \
            explicit.proj_drop

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, channels = tokens.shape
        heads = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, channels // self.num_heads)
        query, key, value = heads.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, tokens, head_dim)
        attended = F.scaled_dot_product_attention(query, key, value,
                                                  dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(attended.transpose(1, 2).reshape(batch, length, channels)))


def use_attention(network: nn.Module, attention: str) -> nn.Module:
    """Puts `attention` (sdpa | explicit, hear21passt's own) into every transformer block of a PaSST."""
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"audio_features.attention={attention!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if attention == "sdpa":
        for block in network.blocks:
            if not isinstance(block.attn, ScaledDotProductAttention):
                block.attn = ScaledDotProductAttention(block.attn)
    return network


def _kept_indices(size: int, dropped: int, device: torch.device) -> torch.Tensor:
    return torch.randperm(size, device=device)[:size - dropped].sort().values


def token_features_on_device(network: nn.Module, spectrogram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hear21passt's `forward_features` (class and distillation tokens) with the structured patchout indices drawn
    on the spectrogram's device: hear21passt draws them on the CPU, and indexing GPU tensors with them copies
    them over and waits for the GPU twice per training step. Same generator and order on a CPU, so equal there."""
    if network.training and network.u_patchout:
        raise ValueError("unstructured patchout is not used by any configuration here")
    patches = network.patch_embed(spectrogram)  # (batch, channels, frequency patches, time patches)
    batch, _, frequency_patches, time_patches = patches.shape
    patches = patches + network.time_new_pos_embed[..., :time_patches] + network.freq_new_pos_embed
    if network.training and network.s_patchout_t:
        patches = patches[..., _kept_indices(time_patches, network.s_patchout_t, patches.device)]
    if network.training and network.s_patchout_f:
        patches = patches[:, :, _kept_indices(frequency_patches, network.s_patchout_f, patches.device)]
    class_token = network.cls_token.expand(batch, -1, -1) + network.new_pos_embed[:, :1]
    distillation_token = network.dist_token.expand(batch, -1, -1) + network.new_pos_embed[:, 1:]
    tokens = torch.cat((class_token, distillation_token, patches.flatten(2).transpose(1, 2)), dim=1)
    tokens = network.norm(network.blocks(network.pos_drop(tokens)))
    return tokens[:, 0], tokens[:, 1]


def _build_passt(variant_name: str, variant: PasstVariant, window_samples: int, pretrained: bool,
                 s_patchout_t: int, s_patchout_f: int) -> nn.Module:
    if variant.arch is None:
        if pretrained:
            raise ValueError(f"audio_features.model={variant_name!r} has no pretrained weights; "
                             f"set audio_features.model_config.pretrained=False or use model='passt'")
        network = hear21passt_models.PaSST(
            img_size=(MEL_BINS, mel_frames(window_samples)), patch_size=16,
            stride=variant.patch_stride, embed_dim=variant.embed_dim, depth=variant.depth,
            num_heads=variant.num_heads, distilled=True, num_classes=0,
            s_patchout_t=s_patchout_t, s_patchout_f=s_patchout_f)
    else:
        try:
            # get_model prints the whole network; keep the run's log readable.
            with contextlib.redirect_stdout(io.StringIO()):
                network = hear21passt_models.get_model(
                    arch=variant.arch, pretrained=pretrained, n_classes=527,
                    fstride=variant.patch_stride, tstride=variant.patch_stride, input_tdim=variant.input_frames,
                    s_patchout_t=s_patchout_t, s_patchout_f=s_patchout_f)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            raise RuntimeError(
                f"PaSST weights '{variant.arch}' could not be downloaded ({error}). Fetch them once on a "
                f"machine with internet (they are cached under $TORCH_HOME/hub/checkpoints, default "
                f"~/.cache/torch/hub/checkpoints; see README, 'Pretrained weights') or set "
                f"audio_features.model_config.pretrained=False") from None
    # Only the token embeddings are used: drop the AudioSet classifier so it holds no parameters.
    network.head = nn.Identity()
    network.head_dist = None
    hear21passt_models.first_RUN = False  # silences hear21passt's per-shape debug prints
    return network


class PasstEncoder(nn.Module):
    """Window embeddings of zero-padded clips: (batch, windows, embed_dim) and a mask of real windows.

    Windows that hold only padding never reach the transformer (their rows are zero and masked), unless
    `embed_padding_windows`: the published own-caption TAP attends over every window, silence included.
    `attention="explicit"` keeps hear21passt's softmax(QK^T)V; the default computes the same with SDPA kernels.
    `augment_on_device`: the mel front end and patchout draw their randomness and build their tensors on the
    audio's device (`DeviceMelSTFT`, `token_features_on_device`) instead of hear21passt's host-side draws.
    """

    def __init__(self, model: str = "passt", window_seconds: float = 10.0, hop_seconds: float = 10.0,
                 pretrained: bool = True, s_patchout_t: int = 0, s_patchout_f: int = 0,
                 freqm: int = 0, timem: int = 0, frozen: bool = False, embed_padding_windows: bool = False,
                 attention: str = "sdpa", augment_on_device: bool = False):
        super().__init__()
        variant = check_model_name(model)
        if not 0 < window_seconds <= variant.max_window_seconds:
            raise ValueError(f"audio_features.segment_length={window_seconds} s must be in "
                             f"(0, {variant.max_window_seconds}] for {model!r}")
        if hop_seconds <= 0:
            raise ValueError(f"audio_features.hop_length={hop_seconds} s must be positive")
        self.window_samples = round(window_seconds * SAMPLE_RATE)
        self.hop_samples = round(hop_seconds * SAMPLE_RATE)
        self.output_size = variant.embed_dim
        self.frozen = frozen
        self.embed_padding_windows = embed_padding_windows
        front_end = DeviceMelSTFT if augment_on_device else MelSTFT
        self.mel = front_end(freqm=freqm, timem=timem, **MEL_SETTINGS)
        self.network = use_attention(
            _build_passt(model, variant, self.window_samples, pretrained, s_patchout_t, s_patchout_f), attention)
        self._token_features = (partial(token_features_on_device, self.network) if augment_on_device
                                else self.network.forward_features)
        if frozen:
            self.requires_grad_(False)
        self.train()  # Lightning keeps each module's mode, so a frozen encoder must start in eval mode

    def compile_transformer(self, backend: str | Callable = "inductor", mode: str = "default") -> None:
        """torch.compile the transformer (called through forward_features, which Module.compile would miss)."""
        self._token_features = torch.compile(self._token_features, backend=backend, mode=mode)

    def train(self, mode: bool = True) -> "PasstEncoder":
        # A frozen encoder stays deterministic: no patchout, no spectrogram masking.
        return super().train(mode and not self.frozen)

    def embed_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """(n, window_samples) audio -> (n, embed_dim): mean of PaSST's class and distillation tokens."""
        spectrogram = self.mel(windows.float()).unsqueeze(1)
        class_token, distillation_token = self._token_features(spectrogram)
        return 0.5 * (class_token + distillation_token)

    def real_window_count(self, samples: int, audio_length: torch.Tensor) -> int:
        """How many windows of clips padded to `samples` hold real audio, from the lengths while they are still on
        the host (before the batch moves to the GPU)."""
        return int(window_mask(audio_length.cpu(), samples, self.window_samples, self.hop_samples).sum())

    def forward(self, audio: torch.Tensor, audio_length: torch.Tensor,
                real_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`real_windows` (`real_window_count` of the batch) lets the real windows be picked without waiting for
        the GPU to say how many there are; the same windows, the same result."""
        windows, mask = split_into_windows(audio, audio_length, self.window_samples, self.hop_samples)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.embed_padding_windows:  # fixed shapes: no host synchronisation
                return self.embed_windows(windows.flatten(0, 1)).unflatten(0, mask.shape), mask
            rows = mask.flatten().nonzero().squeeze(1) if real_windows is None else real_window_rows(mask, real_windows)
            embedded = self.embed_windows(windows[rows // mask.shape[1], rows % mask.shape[1]])
        sequence = embedded.new_zeros(mask.numel(), embedded.shape[-1]).index_copy(0, rows, embedded)
        return sequence.unflatten(0, mask.shape), mask
