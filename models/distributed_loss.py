"""The contrastive loss of the global batch when training runs on several processes (DDP).

Each rank gathers every rank's captions, windows, masks and clip ids (features with gradients), scores only
its own captions against all clips and all captions against its own clips, and takes its share of the loss
(`sharded_contrastive_loss`): the form open_clip calls "local loss with gathered features". The shares sum to
the single-process loss of the concatenated batch, and the gradients flowing back through the gathers make
the DDP-averaged gradient equal the single-process one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from models.losses import sharded_contrastive_loss
from utils.distributed import gather, gather_with_grad


def global_contrastive_loss(model, text: torch.Tensor, windows: torch.Tensor, mask: torch.Tensor,
                            clip_ids: torch.Tensor, weighting: str) -> torch.Tensor:
    """This rank's loss term, scaled by the world size so that DDP's gradient average equals the gradient of the
    single-process loss; its mean over ranks is that loss (log it with sync_dist=True).

    Every rank must hold the same number of captions (training loaders drop the last incomplete batch).
    `model.shard_scores(text, windows, mask, own)` gives the logits; clip_ids are dataset clip indices.
    """
    world, rank, batch = dist.get_world_size(), dist.get_rank(), len(text)
    own = slice(rank * batch, (rank + 1) * batch)
    caption_scores, clip_scores = model.shard_scores(gather_with_grad(text), gather_with_grad(windows),
                                                     gather(mask, value=False), own)
    return world * sharded_contrastive_loss(caption_scores, clip_scores, gather(clip_ids), own, weighting)
