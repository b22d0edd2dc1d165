"""Gathering tensors across DDP ranks: padded to a common shape, with or without gradients, and the evaluation
collection without the repeats a DistributedSampler adds to even out its shards."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as distributed_functional


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def is_rank_zero() -> bool:
    """Whether this process is global rank 0, or runs alone: the launchers (Lightning's script launcher, torchrun,
    SLURM) give every other rank a non-zero rank in its environment before the script starts."""
    return all(os.environ.get(key, "0") == "0" for key in RANK_VARIABLES)


def padded_to_longest(tensor: torch.Tensor, value: float = 0) -> torch.Tensor:
    """Pad dim 1 (windows) to the longest over all ranks, so that every rank's tensor has the same shape."""
    if tensor.dim() < 2:
        return tensor
    length = torch.tensor([tensor.shape[1]], device=tensor.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    padding = [0, 0] * (tensor.dim() - 2) + [0, int(length) - tensor.shape[1]]
    return torch.nn.functional.pad(tensor, padding, value=value)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (same length on every rank) concatenated along dim 0 in rank order; gradients flow
    back to the owning rank."""
    return torch.cat(distributed_functional.all_gather(padded_to_longest(tensor)), dim=0)


def gather(tensor: torch.Tensor, value: float = 0) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0 in rank order, without gradients; lengths may differ."""
    tensor = padded_to_longest(tensor, value).contiguous()
    lengths = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(dist.get_world_size())]
    dist.all_gather(lengths, torch.tensor([len(tensor)], device=tensor.device))
    longest = int(max(lengths))
    padded = torch.cat([tensor, tensor.new_full((longest - len(tensor), *tensor.shape[1:]), value)])
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(length)] for part, length in zip(parts, lengths)])


def first_occurrences(ids: torch.Tensor) -> torch.Tensor:
    """(n,) boolean: True at the first position of every distinct id."""
    order = torch.arange(len(ids), device=ids.device)
    first = torch.full((int(ids.max()) + 1,), len(ids), dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, ids, order, reduce="amin")
    return first[ids] == order


def gather_evaluation(collected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One rank's evaluation collection -> the split's, each clip and its captions once.

    Clip rows: `clip_index` (dataset clip index), `windows`, `mask`; caption rows: `text` and `caption_row` (the
    row of the clip occurrence the caption came with). Repeated clips keep their first occurrence and the
    captions that came with it; clips come back in dataset order, so the ranking adds up as in one process.
    """
    clips = len(collected["clip_index"])
    offsets = gather(torch.tensor([clips], device=collected["clip_index"].device))
    rank_offset = int(offsets[:dist.get_rank()].sum())
    gathered = {key: gather(value, value=False if value.dtype == torch.bool else 0) for key, value in
                {**collected, "caption_row": collected["caption_row"] + rank_offset}.items()}
    keep_clip = first_occurrences(gathered["clip_index"])
    kept_rows = torch.nonzero(keep_clip).squeeze(1)
    kept_rows = kept_rows[torch.argsort(gathered["clip_index"][kept_rows])]  # dataset order, as one process has it
    new_row = torch.full_like(gathered["clip_index"], -1)
    new_row[kept_rows] = torch.arange(len(kept_rows), device=new_row.device)
    caption_rows = new_row[gathered["caption_row"]]
    captions = torch.nonzero(caption_rows >= 0).squeeze(1)
    captions = captions[torch.argsort(caption_rows[captions], stable=True)]
    result = {key: gathered[key][kept_rows] for key in ("clip_index", "windows", "mask")}
    result.update(text=gathered["text"][captions], caption_row=caption_rows[captions])
    return result
