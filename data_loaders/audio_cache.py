"""Decoded, resampled audio kept in one HDF5 file per split, so later runs skip decoding.

Each clip is a float32 dataset keyed by its file name and stamped with the source file's size and
modification time; the file carries the sample rate. A clip whose source changed is decoded again,
the rest are copied. Builds go to a temporary file renamed into place at the end, so a killed
build leaves the previous cache (or none), never a half-written one; runs started together on one
data folder (a sweep) take turns through a lock file, so one decodes and the others reuse its work.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import warnings
from pathlib import Path

import h5py
import numpy as np
import soundfile
import torch
import torchaudio.functional
from tqdm import tqdm


def source_fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def decode_audio(path: Path, sample_rate: int) -> np.ndarray:
    """Mono float32 samples of an audio file at `sample_rate`; unreadable files are named in the error."""
    try:
        samples, source_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
        raise ValueError(f"cannot read audio file {path}: {error}") from None
    if samples.shape[0] == 0:
        raise ValueError(f"audio file {path} holds no samples")
    mono = torch.from_numpy(samples.mean(axis=1))
    if source_rate != sample_rate:
        mono = torchaudio.functional.resample(mono, source_rate, sample_rate)
    return mono.numpy().astype(np.float32, copy=False)


def _dataset_key(file_name: str) -> str:
    return file_name.replace("/", "%2F")


def decoded_length(path: Path, sample_rate: int) -> int:
    """Samples `decode_audio` returns for a file, from its header alone, to within one sample (the resampler's
    rounding of the output length depends on its float precision)."""
    info = soundfile.info(str(path))
    return info.frames if info.samplerate == sample_rate else round(info.frames * sample_rate / info.samplerate)


def stale_clips(cache_path: Path, audio_folder: Path, file_names: list[str], sample_rate: int) -> list[str]:
    """Clips the cache lacks, holds from an older source file, or holds at the wrong length; all of them if the
    rate differs or the file cannot be opened (a killed copy, a full disk), each repair announced in one line."""
    if not cache_path.is_file():
        return list(file_names)
    try:
        cache = h5py.File(cache_path, "r")
    except OSError as error:
        warnings.warn(f"audio cache {cache_path} cannot be opened ({error}); rebuilding it", stacklevel=2)
        return list(file_names)
    with cache:
        if cache.attrs.get("sample_rate") != sample_rate:
            return list(file_names)
        stale = []
        for name in file_names:
            key, source = _dataset_key(name), audio_folder / name
            if key not in cache or cache[key].attrs.get("source") != source_fingerprint(source):
                stale.append(name)
                continue
            expected = decoded_length(source, sample_rate)
            if cache[key].ndim != 1 or abs(cache[key].shape[0] - expected) > 1:
                warnings.warn(f"audio cache {cache_path}: clip {name!r} holds {cache[key].shape} samples, its source "
                              f"decodes to {expected}; decoding it again", stacklevel=2)
                stale.append(name)
        return stale


class _DecodeJobs(torch.utils.data.Dataset):
    def __init__(self, audio_folder: Path, file_names: list[str], sample_rate: int):
        self.audio_folder, self.file_names, self.sample_rate = audio_folder, file_names, sample_rate

    def __len__(self) -> int:
        return len(self.file_names)

    def __getitem__(self, index: int) -> tuple[str, np.ndarray]:
        name = self.file_names[index]
        return name, decode_audio(self.audio_folder / name, self.sample_rate)


@contextlib.contextmanager
def exclusive_build(cache_path: Path):
    """Holds `<cache>.lock` while the block runs; the kernel releases it when its holder dies, so no stale lock."""
    lock_path = cache_path.with_name(cache_path.name + ".lock")
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that is building {cache_path}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_cache(cache_path: Path, audio_folder: Path, file_names: list[str], sample_rate: int,
                num_workers: int = 0) -> Path:
    """Bring the cache up to date for exactly `file_names`; decodes only what is stale.

    An up-to-date cache is used without the lock (its folder may be read-only); the check under the lock is the
    one that announces repairs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not stale_clips(cache_path, audio_folder, file_names, sample_rate):
            return cache_path
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_build(cache_path):  # what was stale may have been built while this run waited
        to_decode = stale_clips(cache_path, audio_folder, file_names, sample_rate)
        if to_decode:
            _write_cache(cache_path, audio_folder, file_names, to_decode, sample_rate, num_workers)
    return cache_path


def _write_cache(cache_path: Path, audio_folder: Path, file_names: list[str], to_decode: list[str],
                 sample_rate: int, num_workers: int) -> None:
    # One fixed name, safe under the lock: a killed build's leftover (gigabytes for Clotho) is replaced by the next
    # build instead of staying beside it, as a per-writer name (utils/files.py) would.
    partial = cache_path.with_name(cache_path.name + ".partial")
    partial.unlink(missing_ok=True)
    reusable = set(file_names) - set(to_decode)
    # Its own generator: a DataLoader draws its workers' seed from the one it is given, by default torch's global
    # one, which would make a run that builds the cache train on other random numbers than the same run on it.
    jobs = torch.utils.data.DataLoader(_DecodeJobs(audio_folder, to_decode, sample_rate), batch_size=None,
                                       num_workers=num_workers, generator=torch.Generator())
    with h5py.File(partial, "w") as cache:
        cache.attrs["sample_rate"] = sample_rate
        if reusable:
            with h5py.File(cache_path, "r") as previous:
                for name in reusable:
                    previous.copy(previous[_dataset_key(name)], cache, name=_dataset_key(name))
        for name, samples in tqdm(jobs, total=len(to_decode), desc=f"caching {audio_folder.name} audio",
                                  unit="clip"):
            dataset = cache.create_dataset(_dataset_key(name), data=samples)
            dataset.attrs["source"] = source_fingerprint(audio_folder / name)
    os.replace(partial, cache_path)


class AudioCache:
    """Read side of the cache; opens the HDF5 file lazily so each DataLoader worker gets its own handle."""

    def __init__(self, cache_path: Path):
        self.cache_path = cache_path
        self._file: h5py.File | None = None

    def _clip(self, file_name: str) -> h5py.Dataset:
        if self._file is None:
            self._file = h5py.File(self.cache_path, "r")
        return self._file[_dataset_key(file_name)]

    def read(self, file_name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._clip(file_name)[start:stop]

    def length(self, file_name: str) -> int:
        return self._clip(file_name).shape[0]

    def __getstate__(self) -> dict:
        return {"cache_path": self.cache_path, "_file": None}
