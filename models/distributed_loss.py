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
import torch.distributed.nn.functional as distributed_functional

from models.losses import sharded_contrastive_loss


def padded_to_longest(tensor: torch.Tensor, value: float = 0) -> torch.Tensor:
    """Pad dim 1 (windows) to the longest over all ranks, so that every rank's tensor has the same shape."""
    if tensor.dim() < 2:
        return tensor
    length = torch.tensor([tensor.shape[1]], device=tensor.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    padding = [0, 0] * (tensor.dim() - 2) + [0, int(length) - tensor.shape[1]]
    return torch.nn.functional.pad(tensor, padding, value=value)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0 in rank order; gradients flow back to the owning rank."""
    return torch.cat(distributed_functional.all_gather(padded_to_longest(tensor)), dim=0)


def gather(tensor: torch.Tensor, value: float = 0) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0 in rank order (no gradients: masks, ids)."""
    tensor = padded_to_longest(tensor, value).contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


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
