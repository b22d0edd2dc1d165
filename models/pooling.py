"""Pooling a clip's window sequence into one embedding, and scoring captions against clips.

`score(text, windows, mask)` is the one interface: projected captions (captions, dim), projected
windows (clips, windows, dim) and their mask (clips, windows) in, (captions, clips) similarities out.
Text arrives unnormalised (TAP queries with it, as published) and each pooling L2-normalises both sides
when `normalize`. `rank_split` scores a whole evaluation split; only the published own-caption protocol
needs to know there which caption belongs to which clip.
"""
from __future__ import annotations

import math

import torch
from torch import nn

AGGREGATIONS = ("mean", "TAP", "TAP_own_caption")
TAP_INITS = ("random", "mean")
SCORING_MEMORY_BYTES = 256 * 2**20  # working memory one block of the full-split scorer may use


def masked_mean(windows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the windows that hold audio. windows: (batch, windows, dim); mask: (batch, windows)."""
    weights = mask.to(windows.dtype).unsqueeze(-1)
    return (windows * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class Pooling(nn.Module):
    """What every pooling shares: optional L2 normalisation, and split ranking through `score`."""

    uses_padding_windows = False  # True: the audio encoder must embed windows that hold only padding

    def __init__(self, normalize: bool = True):
        super().__init__()
        self.normalize = normalize

    def normalized(self, embeddings: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(embeddings, dim=-1) if self.normalize else embeddings

    def score(self, text: torch.Tensor, windows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rank_split(self, text: torch.Tensor, windows: torch.Tensor, mask: torch.Tensor,
                   caption_clip: torch.Tensor) -> torch.Tensor:
        """Every caption of a split against every clip; caption_clip: (captions,) ground-truth clip rows."""
        return self.score(text, windows, mask)

    def shard_scores(self, text: torch.Tensor, windows: torch.Tensor, mask: torch.Tensor,
                     own: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """For a batch gathered from every rank (caption i drawn with clip i): this rank's captions against all
        clips (own, batch), and all captions against this rank's clips (batch, own)."""
        return self.score(text[own], windows, mask), self.score(text, windows[own], mask[own])


class MeanPooling(Pooling):
    """Caption-independent pooling: every caption sees the same clip embedding."""

    def forward(self, windows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.normalized(masked_mean(windows, mask))

    def score(self, text: torch.Tensor, windows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.normalized(text) @ self(windows, mask).t()


def block_size(total: int, bytes_per_item: int, memory_bytes: int) -> int:
    """How many items fit a memory budget (at least one)."""
    return max(1, min(total, memory_bytes // max(1, bytes_per_item)))


def check_tap_hyperparams(dim: int, p_dropout_weights: float, p_dropout_proj: float, init: str = "random") -> None:
    """Raise ValueError naming the offending `tap_hyperparams` key."""
    if init not in TAP_INITS:
        raise ValueError(f"tap_hyperparams.init={init!r} is not one of {', '.join(TAP_INITS)}")
    if dim < 1:
        raise ValueError(f"tap_hyperparams.dim={dim} must be a positive integer")
    for name, p in (("p_dropout_weights", p_dropout_weights), ("p_dropout_proj", p_dropout_proj)):
        if not 0 <= p < 1:
            raise ValueError(f"tap_hyperparams.{name}={p} must be in [0, 1)")


class TextAwareAttentionPooling(Pooling):
    """TAP (Xin, Yang, Zou): the caption queries the clip's windows, so each caption sees its own clip embedding.

    query = Wq LN(text), keys/values = Wk/Wv LN(windows), softmax over unpadded windows (attention-weight
    dropout), then Wo back to the shared width, LayerNorm, dropout and, if `normalize`, L2 normalisation.
    With `shared_norm` (published) the three LayerNorms are one module; otherwise each has its own.
    `init="mean"` starts TAP as (centred) mean pooling instead of random projections: see `start_as_mean`.
    """

    def __init__(self, shared_size: int, dim: int = 1024, p_dropout_weights: float = 0.1,
                 p_dropout_proj: float = 0.1, normalize: bool = True, shared_norm: bool = True,
                 init: str = "random", scoring_memory_bytes: int = SCORING_MEMORY_BYTES):
        super().__init__(normalize)
        check_tap_hyperparams(dim, p_dropout_weights, p_dropout_proj, init)
        self.output_norm = nn.LayerNorm(shared_size)
        self.text_norm = self.output_norm if shared_norm else nn.LayerNorm(shared_size)
        self.window_norm = self.output_norm if shared_norm else nn.LayerNorm(shared_size)
        self.query = nn.Linear(shared_size, dim)
        self.key = nn.Linear(shared_size, dim)
        self.value = nn.Linear(shared_size, dim)
        self.output = nn.Linear(dim, shared_size)
        self.weight_dropout = nn.Dropout(p_dropout_weights)
        self.output_dropout = nn.Dropout(p_dropout_proj)
        self.scoring_memory_bytes = scoring_memory_bytes
        if init == "mean":
            self.start_as_mean()

    @torch.no_grad()
    def start_as_mean(self) -> None:
        """Zero query (uniform attention over the real windows) and value/output maps whose product is the
        identity (exactly when dim >= shared width), so TAP starts as LayerNorm(mean of the normalised windows
        + the output bias).

        With random projections and encoders whose windows still look alike (random init, small data), the
        pooled embeddings of different clips start nearly equal and the constant terms (biases, LayerNorm)
        win: training collapses to equal scores for every clip (loss log(batch)). Starting from mean pooling,
        which learns from the same start, attention is learned as a departure from it.
        """
        nn.init.zeros_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        nn.init.eye_(self.value.weight)
        nn.init.zeros_(self.value.bias)
        nn.init.eye_(self.output.weight)  # its bias keeps its random init: a pair whose attention weights were
        # all dropped pools to that bias, which LayerNorm can normalise (a zero vector it cannot)

    def attention(self, text: torch.Tensor, windows: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention weights (captions, clips, windows), zero on padding and after attention-weight dropout,
        and the windows' values (clips, windows, dim)."""
        query = self.query(self.text_norm(text))
        normed = self.window_norm(windows)
        keys = self.key(normed)
        logits = torch.einsum("cd,awd->caw", query, keys) / math.sqrt(query.shape[-1])
        weights = logits.masked_fill(~mask.unsqueeze(0), float("-inf")).softmax(dim=-1)
        return self.weight_dropout(weights), self.value(normed)

    def forward(self, text: torch.Tensor, windows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each clip's embedding as seen by each caption: (captions, clips, shared).

        The output projection (and its bias) comes after pooling: under attention-weight dropout the
        weights no longer sum to one, so it must not be moved inside the sum.
        """
        weights, values = self.attention(text, windows, mask)
        pooled = self.output(torch.einsum("caw,awd->cad", weights, values))
        return self.normalized(self.output_dropout(self.output_norm(pooled)))

    def _score_closed_form(self, text: torch.Tensor, windows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """forward(...) · normalized(text) without materialising (captions, clips, shared): exact when dropout
        is off.

        With x = sum_w a_w u_w (u_w: projected windows), LayerNorm and the norm of its output need only
        a·(u_w · g), a's mean of u_w, and the Gram forms a^T (u u^T) a, so everything of width `shared`
        is a matrix product over (caption, window) pairs.
        """
        weights, values = self.attention(text, windows, mask)
        projected = self.output(values)  # weights sum to one here (no dropout), so Wo moves inside the sum
        gamma, beta, eps = self.output_norm.weight, self.output_norm.bias, self.output_norm.eps
        width = projected.shape[-1]
        text = self.normalized(text)

        def pooled_dot(vectors: torch.Tensor) -> torch.Tensor:  # (c, d) -> x · vectors[c]: (c, a)
            return (weights * torch.einsum("cd,awd->caw", vectors, projected)).sum(-1)

        def quadratic(scale: torch.Tensor) -> torch.Tensor:  # sum_d scale_d x_d^2: (c, a)
            gram = torch.einsum("awd,avd->awv", projected * scale, projected)
            return (torch.einsum("caw,awv->cav", weights, gram) * weights).sum(-1)

        ones = torch.ones_like(gamma)
        mean = pooled_dot(ones.unsqueeze(0) / width)
        std = (quadratic(ones / width) - mean ** 2).clamp(min=0).add(eps).sqrt()
        # y = gamma * (x - mean) / std + beta
        y_dot_text = (pooled_dot(gamma * text) - mean * (gamma * text).sum(-1, keepdim=True)) / std \
            + (beta * text).sum(-1, keepdim=True)
        if not self.normalize:
            return y_dot_text
        gamma2, gamma_beta = gamma ** 2, gamma * beta
        centred_gamma2 = quadratic(gamma2) - 2 * mean * pooled_dot(gamma2.unsqueeze(0)) + mean ** 2 * gamma2.sum()
        centred_gamma_beta = pooled_dot(gamma_beta.unsqueeze(0)) - mean * gamma_beta.sum()
        y_norm_sq = centred_gamma2 / std ** 2 + 2 * centred_gamma_beta / std + (beta ** 2).sum()
        return y_dot_text / y_norm_sq.clamp(min=1e-24).sqrt()

    def score(self, text: torch.Tensor, windows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(captions, clips) similarities, in caption x clip blocks sized to `scoring_memory_bytes`.

        Training (dropout active) materialises each pair's pooled embedding; evaluation uses the exact
        closed form, whose memory per pair is a few windows' worth instead of `shared` floats.
        """
        materialise = self.training and (self.weight_dropout.p > 0 or self.output_dropout.p > 0)
        clips, window_count, width = windows.shape
        per_pair = 4 * (4 * width if materialise else 8 * window_count + window_count ** 2)
        clip_block = block_size(clips, per_pair * min(len(text), 64), self.scoring_memory_bytes)
        caption_block = block_size(len(text), per_pair * clip_block, self.scoring_memory_bytes)
        rows = []
        for first_caption in range(0, len(text), caption_block):
            captions = text[first_caption:first_caption + caption_block]
            row = []
            for first_clip in range(0, clips, clip_block):
                block = slice(first_clip, first_clip + clip_block)
                if materialise:
                    pooled = self(captions, windows[block], mask[block])
                    row.append((pooled * self.normalized(captions).unsqueeze(1)).sum(-1))
                else:
                    row.append(self._score_closed_form(captions, windows[block], mask[block]))
            rows.append(torch.cat(row, dim=1))
        return torch.cat(rows, dim=0)


class OwnCaptionAttentionPooling(TextAwareAttentionPooling):
    """The TAP protocol of the published 31.91 / 32.45 runs, kept to reproduce and measure them.

    Each clip is pooled once, by one caption, over all of its windows (no mask: padding windows, embedded
    from silence, take part), and every caption is scored against that one embedding by a dot product.
    In training the pooling caption is the sample's own (clip i with caption i); in split ranking it is the
    clip's first ground-truth caption, so evaluation sees one true caption of every clip: a leak.
    """

    uses_padding_windows = True

    def pool(self, pooling_text: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """Clip i pooled by pooling_text[i]: (clips, dim), (clips, windows, dim) -> (clips, dim)."""
        query = self.query(self.text_norm(pooling_text))
        normed = self.window_norm(windows)
        logits = torch.einsum("ad,awd->aw", query, self.key(normed)) / math.sqrt(query.shape[-1])
        weights = self.weight_dropout(logits.softmax(dim=-1))
        pooled = self.output(torch.einsum("aw,awd->ad", weights, self.value(normed)))
        return self.normalized(self.output_dropout(self.output_norm(pooled)))

    def score(self, text: torch.Tensor, windows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Training batch: caption i was drawn with clip i, and pools it."""
        if len(text) != len(windows):
            raise ValueError(f"own-caption pooling needs one caption per clip, got {len(text)} and {len(windows)}")
        return self.normalized(text) @ self.pool(text, windows).t()

    def shard_scores(self, text: torch.Tensor, windows: torch.Tensor, mask: torch.Tensor,
                     own: slice) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.pool(text, windows)  # every clip by its own caption, as in `score`
        return self.normalized(text[own]) @ pooled.t(), self.normalized(text) @ pooled[own].t()

    def rank_split(self, text: torch.Tensor, windows: torch.Tensor, mask: torch.Tensor,
                   caption_clip: torch.Tensor) -> torch.Tensor:
        first_caption = torch.full((len(windows),), len(text), dtype=torch.long, device=text.device)
        first_caption.scatter_reduce_(0, caption_clip, torch.arange(len(text), device=text.device), reduce="amin")
        if bool((first_caption == len(text)).any()):
            raise ValueError("own-caption pooling: a clip of the split has no caption")
        return self.normalized(text) @ self.pool(text[first_caption], windows).t()


POOLINGS = {"mean": MeanPooling, "TAP": TextAwareAttentionPooling, "TAP_own_caption": OwnCaptionAttentionPooling}


def make_pooling(aggregate: str, shared_size: int, normalize: bool, tap_hyperparams: dict) -> Pooling:
    """The pooling `audio_features.aggregate` names; `tap_hyperparams` (dim, p_dropout_weights, p_dropout_proj,
    shared_norm, init) configure the attention poolings."""
    if aggregate not in POOLINGS:
        raise ValueError(f"audio_features.aggregate={aggregate!r} is not one of {', '.join(POOLINGS)}")
    if aggregate == "mean":
        return MeanPooling(normalize=normalize)
    return POOLINGS[aggregate](shared_size, normalize=normalize, **tap_hyperparams)
