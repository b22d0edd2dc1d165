"""Caption encoders from `transformers` (RoBERTa in the published systems)."""
from __future__ import annotations

import os
import re
import string
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from utils.devices import to_device

KNOWN_TEXT_MODELS = ("roberta-base", "roberta-large", "bert-base-uncased", "bert-large-uncased")
PUNCTUATION_MODES = ("delete", "space")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")  # transformers' names: fused SDPA kernels | explicit softmax
PADDINGS = ("longest", "max_length")  # pad each batch to its longest caption (published) | to max_sentence_tokens
PUBLISHED_DROPOUT = 0.2  # hidden and attention dropout the published code sets in from_pretrained
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_caption(caption: str, lowercase: bool = True, remove_punctuation: bool = True,
                      punctuation: str = "delete") -> str:
    """Clotho captions vary in case and punctuation; neither carries meaning for retrieval.

    `delete` is the published normalisation ("nature's" -> "natures", whitespace left as it is); `space`
    puts a space for each mark and collapses whitespace ("nature's" -> "nature s").
    """
    if lowercase:
        caption = caption.lower()
    if not remove_punctuation:
        return caption
    if punctuation == "delete":
        return caption.translate(_DELETE_PUNCTUATION)
    if punctuation == "space":
        return " ".join(_PUNCTUATION.sub(" ", caption).split())
    raise ValueError(f"sentence_features.punctuation={punctuation!r} is not one of {', '.join(PUNCTUATION_MODES)}")


def resolve_text_model(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """A local directory (as given, or relative to the data folder) wins over a Hub name.

    Raises ValueError listing the choices if `name` is neither a known Hub model nor a directory.
    """
    for candidate in (Path(name).expanduser(), Path(data_dir).expanduser() / name if data_dir else None):
        if candidate is not None and (candidate / "config.json").is_file():
            return str(candidate)
    if name in KNOWN_TEXT_MODELS:
        return name
    # A model inside the data folder (the demo's) is most often missed because the data folder itself is wrong.
    no_data_dir = " (that folder does not exist)" if data_dir and not Path(data_dir).expanduser().is_dir() else ""
    raise ValueError(f"sentence_features.model={name!r} is unknown: choose one of {', '.join(KNOWN_TEXT_MODELS)}, "
                     f"or a directory holding a transformers model (config.json), absolute or relative to "
                     f"directories.data_dir={data_dir}{no_data_dir}")


def text_model_available(model_path: str) -> bool:
    """True for a local model directory, or a Hub model already in the local cache."""
    if (Path(model_path) / "config.json").is_file():
        return True
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(model_path, "config.json"), str)


def _load_pretrained(loader, model_path: str, **settings):
    try:
        return loader.from_pretrained(model_path, **settings)
    except (OSError, ValueError) as error:
        raise RuntimeError(
            f"text model '{model_path}' could not be loaded ({str(error).splitlines()[0]}). On a machine with "
            f"internet it is fetched once into $HF_HOME (default ~/.cache/huggingface); for offline use, "
            f"pre-fetch it there and set HF_HUB_OFFLINE=1 (README, 'Pretrained weights')") from None


def expanded_attention_mask(mask: torch.Tensor, attention: str, dtype: torch.dtype) -> torch.Tensor:
    """(batch, tokens) 0/1 mask -> the (batch, 1, 1, tokens) mask `attention` takes: True where SDPA attends, or
    eager's additive bias. transformers builds the same from the 2D mask, but first reads `mask.all()` back from the
    device (to drop an all-ones mask), which waits for the GPU in every step; a 4D mask is passed through as is."""
    keep = mask.bool()[:, None, None, :]
    if attention == "sdpa":
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)


class TextEncoder(nn.Module):
    """Embeds captions with the first token's final hidden state (<s> / [CLS]).

    Dropout: the published code loads the model with hidden and attention dropout 0.2, but
    `from_pretrained` returns it in eval mode and Lightning (2.2 there, 2.6 here) keeps each module's mode,
    so the published runs trained the text encoder with its dropout off. `train_dropout=False` keeps that;
    True switches the 0.2 dropout on in training. `attention` picks transformers' implementation: sdpa (fused
    kernels) or eager (explicit softmax); both compute the same function. `padding="max_length"` pads every batch
    to `max_sentence_tokens` (fixed shapes for compiled graphs); the padding is masked, so embeddings do not change.
    """

    def __init__(self, model_path: str, max_sentence_tokens: int = 32, lowercase: bool = True,
                 remove_punctuation: bool = True, punctuation: str = "delete", frozen: bool = False,
                 train_dropout: bool = False, attention: str = "sdpa", padding: str = "longest"):
        super().__init__()
        if max_sentence_tokens < 2:
            raise ValueError(f"sentence_features.max_sentence_tokens={max_sentence_tokens} must be >= 2")
        if punctuation not in PUNCTUATION_MODES:
            raise ValueError(f"sentence_features.punctuation={punctuation!r} is not one of "
                             f"{', '.join(PUNCTUATION_MODES)}")
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"sentence_features.attention={attention!r} is not one of "
                             f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
        if padding not in PADDINGS:
            raise ValueError(f"sentence_features.padding={padding!r} is not one of {', '.join(PADDINGS)}")
        self.tokenizer = _load_pretrained(AutoTokenizer, model_path)
        # Only the first token's hidden state is used: no pooler (as published; saves its unused weights).
        self.model = _load_pretrained(AutoModel, model_path, add_pooling_layer=False,
                                      hidden_dropout_prob=PUBLISHED_DROPOUT,
                                      attention_probs_dropout_prob=PUBLISHED_DROPOUT, attn_implementation=attention)
        self.output_size = self.model.config.hidden_size
        self.max_sentence_tokens = max_sentence_tokens
        self.attention, self.padding = attention, padding
        self.lowercase = lowercase
        self.remove_punctuation = remove_punctuation
        self.punctuation = punctuation
        self.frozen = frozen
        self.train_dropout = train_dropout
        if frozen:
            self.requires_grad_(False)
        self.train()  # Lightning keeps each module's mode: set the one training needs now

    def compile_transformer(self, backend: str | Callable = "inductor", mode: str = "default") -> None:
        self.model.compile(backend=backend, mode=mode)

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(mode and self.train_dropout and not self.frozen)

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        normalized = [normalize_caption(c, self.lowercase, self.remove_punctuation, self.punctuation)
                      for c in captions]
        return self.tokenizer(normalized, padding=self.padding, truncation=True, max_length=self.max_sentence_tokens,
                              return_tensors="pt")

    def forward(self, captions: list[str]) -> torch.Tensor:
        """captions: list of length batch -> (batch, hidden_size)."""
        device = next(self.model.parameters()).device
        return self.embed_tokens({key: to_device(value, device) for key, value in self.tokenize(captions).items()})

    def embed_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """`tokenize`'s tensors, on the model's device -> (batch, hidden_size). Device work only: a recorded CUDA
        graph can replay it on new tokens copied into the same tensors."""
        tokens = {**tokens, "attention_mask": expanded_attention_mask(tokens["attention_mask"], self.attention,
                                                                      self.model.dtype)}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden = self.model(**tokens).last_hidden_state
        # A copy, not a view: under CUDA graphs the hidden states live in a buffer the next replay overwrites.
        return hidden[:, 0].clone()
