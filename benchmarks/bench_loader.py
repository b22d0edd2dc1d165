"""The training DataLoader alone: captions per second out of the HDF5 audio cache, float32 vs float16 samples.

    python -m benchmarks.bench_loader --clips 200 --workers 0 1 2

Writes `--clips` noise clips (32 kHz, 15-30 s) in Clotho's layout, builds the float32 cache with the real
`build_cache`, copies it to a float16 cache, and iterates the real training dataset (random caption order, whole
clips, zero-padded to 30 s by the real collate) for each worker count, with pinned memory as on a GPU machine when
`--pin-memory` is given. The float16 copy also reports its largest rounding error against float32.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.bench_stage1 import machine, report, write_noise_dataset
from data_loaders.audio_cache import AudioCache, build_cache
from data_loaders.clotho_v2 import ClipCaptions, read_captions
from data_loaders.data_loader import CaptionAudioDataset, PadCollate
from models.audio.passt import SAMPLE_RATE

CLIP_SAMPLES = 30 * SAMPLE_RATE


def float16_copy(source: Path, target: Path) -> float:
    """The cache with every clip stored as float16; returns the largest absolute rounding error."""
    largest = 0.0
    with h5py.File(source, "r") as full, h5py.File(target, "w") as half:
        half.attrs.update(full.attrs)
        for key in full:
            samples = full[key][()]
            rounded = samples.astype(np.float16)
            largest = max(largest, float(np.abs(rounded.astype(np.float32) - samples).max()))
            half.create_dataset(key, data=rounded).attrs.update(full[key].attrs)
    return largest


def samples_per_second(clips: list[ClipCaptions], cache_path: Path, workers: int, batch_size: int,
                       batches: int, pin_memory: bool) -> float:
    dataset = CaptionAudioDataset(clips, AudioCache(cache_path), CLIP_SAMPLES)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        collate_fn=PadCollate(CLIP_SAMPLES), pin_memory=pin_memory,
                        persistent_workers=workers > 0)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=200, help="development clips to write (5 captions each)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per setting")
    parser.add_argument("--pin-memory", action="store_true")
    parser.add_argument("--json", help="also append each result as a JSON line to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        dataset = write_noise_dataset(Path(folder) / "clotho", {"development": args.clips}, text=None)
        audio_folder = dataset / "development"
        clips = read_captions(dataset / "clotho_captions_development.csv")
        caches = {"float32": build_cache(dataset / "cache" / "development.h5", audio_folder,
                                         [clip.file_name for clip in clips], SAMPLE_RATE)}
        caches["float16"] = dataset / "cache" / "development-float16.h5"
        error = float16_copy(caches["float32"], caches["float16"])
        for dtype, path in caches.items():
            megabytes_per_clip = path.stat().st_size / args.clips / 2**20
            for workers in args.workers:
                rate = samples_per_second(clips, path, workers, args.batch_size, args.batches, args.pin_memory)
                report({"machine": machine("cpu"), "cache": dtype, "workers": workers, "batch": args.batch_size,
                        "pin_memory": args.pin_memory, "samples_per_second": rate,
                        "cache_mib_per_clip": megabytes_per_clip,
                        **({"largest_rounding_error": error} if dtype == "float16" else {})}, args.json)


if __name__ == "__main__":
    main()
