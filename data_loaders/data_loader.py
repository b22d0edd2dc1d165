"""Datasets over the audio cache, padding collate, and the `data_loader` ingredient.

Training iterates captions (every caption is a sample); evaluation iterates clips, each with all
of its captions, so a clip's audio is encoded once per evaluation.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from sacred import Ingredient
from torch.utils.data import DataLoader, Dataset

from data_loaders.audio_cache import AudioCache, build_cache
from data_loaders.clotho_v2 import ClipCaptions, clotho_v2, dataset_folder, load_split
from models.audio.windowing import padded_length

data_loader = Ingredient("data_loader")


@data_loader.config
def data_loader_config():
    batch_size = 16  # training captions per step
    batch_size_eval = 16  # clips per evaluation step
    n_workers = 4  # DataLoader worker processes (also decode the audio cache in parallel)


class _CachedClips(Dataset):
    def __init__(self, clips: list[ClipCaptions], cache: AudioCache, clip_samples: int):
        self.clips, self.cache, self.clip_samples = clips, cache, clip_samples
        self.padded_samples = clip_samples  # the length every batch is zero-padded to

    def _audio(self, file_name: str, crop_samples: int | None = None) -> torch.Tensor:
        available = min(self.cache.length(file_name), self.clip_samples)
        if crop_samples is None or available <= crop_samples:
            return torch.from_numpy(self.cache.read(file_name, 0, available))
        start = random.randint(0, available - crop_samples)
        return torch.from_numpy(self.cache.read(file_name, start, start + crop_samples))


class CaptionAudioDataset(_CachedClips):
    """One item per caption: its clip's audio (randomly cropped to `crop_samples` if given). `padded_samples`: the
    length batches are padded to (default: the clip's)."""

    def __init__(self, clips: list[ClipCaptions], cache: AudioCache, clip_samples: int,
                 crop_samples: int | None = None, padded_samples: int | None = None):
        super().__init__(clips, cache, clip_samples)
        self.crop_samples = crop_samples
        self.padded_samples = min(padded_samples or clip_samples, clip_samples)
        self.samples = [(index, caption) for index, clip in enumerate(clips) for caption in clip.captions]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        clip_index, caption = self.samples[index]
        audio = self._audio(self.clips[clip_index].file_name, self.crop_samples)
        return {"audio": audio, "caption": caption, "clip_index": clip_index}


class ClipDataset(_CachedClips):
    """One item per clip with all of its captions, for evaluation."""

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        clip = self.clips[index]
        return {"audio": self._audio(clip.file_name), "captions": list(clip.captions), "clip_index": index}


def pad_collate(items: list[dict], clip_samples: int) -> dict:
    """Zero-pads audio to `clip_samples`: audio (batch, clip_samples), audio_length (batch,). Evaluation batches
    also get `caption_clip`, the batch row of each caption's clip, made here so that it reaches the GPU with the
    batch's pinned copy instead of a copy that waits for the GPU."""
    audio = torch.zeros(len(items), clip_samples)
    for row, item in enumerate(items):
        audio[row, :item["audio"].shape[0]] = item["audio"]
    batch = {"audio": audio,
             "audio_length": torch.tensor([item["audio"].shape[0] for item in items]),
             "clip_index": torch.tensor([item["clip_index"] for item in items])}
    for key in ("caption", "captions"):
        if key in items[0]:
            batch[key] = [item[key] for item in items]
    if "captions" in batch:
        batch["caption_clip"] = torch.tensor([row for row, captions in enumerate(batch["captions"]) for _ in captions])
    return batch


class PadCollate:
    """Picklable collate for worker processes."""

    def __init__(self, clip_samples: int):
        self.clip_samples = clip_samples

    def __call__(self, items: list[dict]) -> dict:
        return pad_collate(items, self.clip_samples)


@clotho_v2.capture
def get_dataset(split: str, clip_seconds: float, sample_rate: int, crop_seconds: float | None = None,
                crop_windows: tuple[float, float] | None = None, decode_workers: int = 0,
                per_clip: bool = False) -> Dataset:
    """A split's dataset over an up-to-date audio cache (train: per caption, unless `per_clip`; val/test: per clip).

    `crop_windows`: the (window, hop) seconds of an encoder that masks padding windows; batches of crops are then
    padded only as far as the windows that start inside a crop reach, not to the clip (the same windows, a sixth of
    the bytes for 5 s crops of 30 s clips). Without it, crops are padded to the clip length."""
    clips, audio_folder = load_split(split)
    cache_path = Path(dataset_folder()) / "audio_cache" / f"{audio_folder.name}.h5"
    names = [clip.file_name for clip in clips]
    # every rank of a multi-process run asks; the cache's lock lets one build it and the others reuse it
    cache = AudioCache(build_cache(cache_path, audio_folder, names, sample_rate, num_workers=decode_workers))
    clip_samples = round(clip_seconds * sample_rate)
    if split == "train" and not per_clip:
        crop_samples = round(crop_seconds * sample_rate) if crop_seconds else None
        padded_samples = None
        if crop_samples and crop_windows:
            window_samples, hop_samples = (round(seconds * sample_rate) for seconds in crop_windows)
            padded_samples = padded_length(crop_samples, window_samples, hop_samples)
        return CaptionAudioDataset(clips, cache, clip_samples, crop_samples, padded_samples)
    return ClipDataset(clips, cache, clip_samples)


@data_loader.capture
def get_data_loader(dataset: Dataset, train: bool, batch_size: int, batch_size_eval: int,
                    n_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size if train else batch_size_eval, shuffle=train,
                      drop_last=train and len(dataset) > batch_size, num_workers=n_workers,
                      collate_fn=PadCollate(dataset.padded_samples), persistent_workers=n_workers > 0,
                      pin_memory=torch.cuda.is_available())
