"""The training DataLoader alone: captions per second out of the HDF5 audio cache, float32 vs float16 samples.

    python -m benchmarks.bench_loader --clips 200 --workers 0 1 2

Writes `--clips` noise clips (32 kHz, 15-30 s) in Clotho's layout, builds the float32 cache with the real
`build_cache`, copies it to a float16 cache, and iterates the real training dataset (random caption order, whole
clips, zero-padded to 30 s by the real collate) for each worker count, with pinned memory as on a GPU machine when
`--pin-memory` is given. The float16 copy also reports its largest rounding error against float32.

`--parts` adds, for the float32 cache, where a batch's time goes: in a worker, reading its clips, collating them and
moving the batch into shared memory (what the worker's queue does with it); in the training process, the first read
of a batch received from a worker (what the pin-memory thread's copy pays). Each part's captions per second is the
most that one core doing only that part could deliver.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
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


def worker_milliseconds(dataset: CaptionAudioDataset, batch_size: int, batches: int) -> dict[str, float]:
    """Milliseconds per batch of a worker's three parts, run in this process over random captions."""
    order = random.Random(0).sample(range(len(dataset)), batch_size * batches)
    collate = PadCollate(dataset.padded_samples)
    totals = {"read": 0.0, "collate": 0.0, "share": 0.0}
    for first in range(0, len(order), batch_size):
        started = time.perf_counter()
        items = [dataset[index] for index in order[first:first + batch_size]]
        read = time.perf_counter()
        audio = collate(items)["audio"]
        collated = time.perf_counter()
        audio.share_memory_()  # what a worker's queue does with every tensor of a batch
        totals["read"] += read - started
        totals["collate"] += collated - read
        totals["share"] += time.perf_counter() - collated
    return {part: 1000 * seconds / batches for part, seconds in totals.items()}


def receiving_milliseconds(dataset: CaptionAudioDataset, batch_size: int, batches: int) -> float:
    """Milliseconds per batch of the training process's first read of the audio a worker sent, copied into memory
    it already holds (as the pin-memory thread copies into cached pinned blocks). Only the copy is timed: its pages
    are mapped from the worker's shared memory and each is touched here for the first time."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=1,
                        collate_fn=PadCollate(dataset.padded_samples))
    iterator = iter(loader)
    target = next(iterator)["audio"].clone()
    elapsed = 0.0
    for _ in range(batches):
        audio = next(iterator)["audio"]
        started = time.perf_counter()
        target.copy_(audio)
        elapsed += time.perf_counter() - started
    return 1000 * elapsed / batches


def loader_parts(dataset: CaptionAudioDataset, batch_size: int, batches: int) -> dict[str, float]:
    """Each part's milliseconds per batch and the captions per second one core could deliver doing only it."""
    parts = {**worker_milliseconds(dataset, batch_size, batches),
             "receive": receiving_milliseconds(dataset, batch_size, batches)}
    worker = sum(parts[part] for part in ("read", "collate", "share"))
    return {**{f"{part}_ms": milliseconds for part, milliseconds in parts.items()},
            "worker_captions_per_second": 1000 * batch_size / worker,
            "receiving_captions_per_second": 1000 * batch_size / parts["receive"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=200, help="development clips to write (5 captions each)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per setting")
    parser.add_argument("--pin-memory", action="store_true")
    parser.add_argument("--parts", action="store_true", help="also time a batch's parts (float32 cache)")
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
        if args.parts:
            dataset = CaptionAudioDataset(clips, AudioCache(caches["float32"]), CLIP_SAMPLES)
            report({"machine": machine("cpu"), "cache": "float32", "batch": args.batch_size,
                     **loader_parts(dataset, args.batch_size, args.batches)}, args.json)


if __name__ == "__main__":
    main()
