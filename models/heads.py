"""Projections of each modality into the shared retrieval space (normalisation is the pooling's job)."""
from __future__ import annotations

from torch import nn

TEXT_PROJECTIONS = ("none", "linear")


def projection_head(input_size: int, shared_size: int, kind: str = "linear") -> nn.Module:
    """`linear`: one affine map (salsa). `none`: the embedding enters the shared space as it is, as in the code
    that published 30.16 / 31.91 / 32.45 (its text projection was an empty Sequential), so widths must agree."""
    if kind == "linear":
        return nn.Linear(input_size, shared_size)
    if kind == "none":
        if input_size != shared_size:
            raise ValueError(f"sentence_features.projection='none' uses the text embedding unprojected: its width "
                             f"({input_size}) must equal shared_representation_size ({shared_size}); "
                             f"set sentence_features.projection='linear' or shared_representation_size={input_size}")
        return nn.Identity()
    raise ValueError(f"sentence_features.projection={kind!r} is not one of {', '.join(TEXT_PROJECTIONS)}")
