"""Stage-1 embeddings of the training set, stored beside a run's checkpoint and read back as stage-2 teachers.

salsa's stage 2 trains against the audio-caption correspondences that stage-1 models estimate. A stage-1 run
embeds every training clip and caption once (`cmd_generate_embeddings`), in two files beside its checkpoint:
`{train_on}_audio_embeddings_train.pt` keyed by the clip's path relative to the dataset folder, and
`{train_on}_sentence_embeddings_train.pt` keyed by the caption text. The audio file keeps each clip's projected
window sequence and mask, not one pooled vector, together with the run's pooling (its kind, settings and
weights): a teacher then scores a batch with its own `Pooling.score`, which for mean pooling is the cosine of the
pooled embeddings (as salsa) and for TAP is the per-pair score of the stage-1 TAP model, something one vector per
clip cannot give. Both files record the checkpoint (name and size:mtime) and the data set they were made from,
so a stale file is refused before training instead of silently teaching another model's view.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_loaders.audio_cache import source_fingerprint
from data_loaders.clotho_v2 import ClipCaptions
from models.retrieval_model import RetrievalModel
from utils.files import replaced_atomically

FORMAT_VERSION = 1
SHOWN = 3  # names listed in a "missing" error


def embedding_files(checkpoint_folder: Path, train_on: str) -> tuple[Path, Path]:
    """(audio file, caption file) of a run, beside its checkpoints."""
    return (checkpoint_folder / f"{train_on}_audio_embeddings_train.pt",
            checkpoint_folder / f"{train_on}_sentence_embeddings_train.pt")


def save_atomically(content: dict, path: Path) -> None:
    """torch.save that leaves the old file or none when interrupted."""
    with replaced_atomically(path) as temporary:
        torch.save(content, temporary)


@dataclass(frozen=True)
class EmbeddingSource:
    """What a pair of embedding files was made from: checked against the run and the data set at load time."""
    checkpoint: Path
    dataset: str
    train_on: str

    def header(self) -> dict:
        return {"format": FORMAT_VERSION, "checkpoint": self.checkpoint.name,
                "checkpoint_fingerprint": source_fingerprint(self.checkpoint), "dataset": self.dataset,
                "train_on": self.train_on}


def write_embeddings(source: EmbeddingSource, windows: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                     captions: dict[str, torch.Tensor], pooling: dict) -> tuple[Path, Path]:
    """windows: clip path -> (windows, dim); masks: clip path -> (windows,); captions: text -> (dim,);
    pooling: aggregate, shared_size, normalize, tap_hyperparams and state_dict of the run's pooling."""
    audio_path, caption_path = embedding_files(source.checkpoint.parent, source.train_on)
    header = source.header()
    save_atomically({**header, "pooling": pooling, "windows": windows, "masks": masks}, audio_path)
    save_atomically({**header, "captions": captions}, caption_path)
    return audio_path, caption_path


@torch.no_grad()
def embed_training_set(model: RetrievalModel, loader: DataLoader, clip_keys: list[str], device: torch.device,
                       precision: str | int) -> tuple[dict, dict, dict]:
    """Every clip and caption of a per-clip loader through `model` (in eval mode, on `device`) under the autocast of
    a Lightning `precision` ("16-mixed", "bf16-mixed", "32", ...): clip key (`clip_keys[clip_index]`) -> windows
    (windows, dim) and mask (windows,), caption text -> (dim,), all float32 on the CPU."""
    dtype = {"16": torch.float16, "bf": torch.bfloat16}.get(str(precision)[:2])
    windows, masks, captions = {}, {}, {}
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for batch in tqdm(loader, desc="embedding the training set", unit="batch"):
            sequences, mask = model.encode_audio(batch["audio"].to(device), batch["audio_length"].to(device))
            texts = [caption for clip_captions in batch["captions"] for caption in clip_captions]
            # clone: a row of a batch tensor would be saved with the whole batch's storage
            embedded = model.encode_text(texts).float().cpu()
            captions.update((text, vector.clone()) for text, vector in zip(texts, embedded))
            for row, clip_index in enumerate(batch["clip_index"].tolist()):
                key = clip_keys[clip_index]
                windows[key], masks[key] = sequences[row].float().cpu().clone(), mask[row].cpu().clone()
    return windows, masks, captions


@dataclass(frozen=True)
class StoredEmbeddings:
    """One run's stored view of the training set, clips in training-set order."""
    pooling: dict  # aggregate, shared_size, normalize, tap_hyperparams, state_dict
    windows: torch.Tensor  # (clips, windows, dim)
    masks: torch.Tensor  # (clips, windows)
    captions: dict[str, torch.Tensor]  # text -> (dim,)


def _missing(kind: str, names: list[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:SHOWN])
    return f"{len(names)} {kind} of the current training set missing (e.g. {shown})"


def load_stored_embeddings(name: str, checkpoint_folder: Path, train_on: str, dataset: str,
                           clips: list[tuple[str, ClipCaptions]]) -> StoredEmbeddings:
    """Run `name`'s (as given in distill_from) embeddings of the training clips (path relative to the dataset folder,
    clip); any missing, unreadable or stale file is an error naming the run and the file."""
    audio_path, caption_path = embedding_files(checkpoint_folder, train_on)
    remedy = f"make them with `cmd_generate_embeddings with load_parameters={name}` (same data set and train_on)"
    contents = []
    for path in (audio_path, caption_path):
        if not path.is_file():
            raise FileNotFoundError(f"distill_from={name!r}: {path} not found; {remedy}")
        try:
            contents.append(torch.load(path, map_location="cpu", weights_only=False))
        except Exception as error:  # a truncated or foreign file: say which one, whatever torch raised
            raise ValueError(f"distill_from={name!r}: {path} cannot be read ({type(error).__name__}); "
                             f"{remedy}") from None
    audio, text = contents
    for path, content in ((audio_path, audio), (caption_path, text)):
        if not isinstance(content, dict) or content.get("format") != FORMAT_VERSION:
            raise ValueError(f"distill_from={name!r}: {path} is not an embedding file of this version; {remedy}")
        checkpoint = checkpoint_folder / content["checkpoint"]
        if not checkpoint.is_file() or source_fingerprint(checkpoint) != content["checkpoint_fingerprint"]:
            raise ValueError(f"distill_from={name!r}: {path} was made from {checkpoint}, which has changed or gone "
                             f"since (the run was continued or retrained?); {remedy}")
        if content["dataset"] != dataset:
            raise ValueError(f"distill_from={name!r}: {path} was made on the data set {content['dataset']!r}, this "
                             f"run trains on {dataset!r}; {remedy}")
    if audio["checkpoint_fingerprint"] != text["checkpoint_fingerprint"]:
        raise ValueError(f"distill_from={name!r}: {audio_path} and {caption_path} come from different checkpoints; "
                         f"{remedy}")
    missing_clips = [path for path, _ in clips if path not in audio["windows"]]
    missing_captions = sorted({caption for _, clip in clips for caption in clip.captions} - set(text["captions"]))
    for kind, names, path in (("clips", missing_clips, audio_path), ("captions", missing_captions, caption_path)):
        if names:
            raise ValueError(f"distill_from={name!r}: {path}: {_missing(kind, names)}; {remedy}")
    return StoredEmbeddings(audio["pooling"], torch.stack([audio["windows"][path] for path, _ in clips]),
                            torch.stack([audio["masks"][path] for path, _ in clips]), text["captions"])
