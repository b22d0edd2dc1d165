"""Index any audio folder with a trained model, and search it by text.

An index file holds, per audio file (path relative to the folder): its size and modification time, and the
projected window sequences and masks of its 30 s chunks (a file longer than the model's clip is cut into chunks
and scored by its best chunk). It also holds a fingerprint of the model (the checkpoint's bytes and the settings
that shape the embeddings), so that a search with another model is refused rather than silently wrong. Re-indexing
embeds only new or changed files and drops deleted ones; the file is written to a temporary sibling and renamed.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from data_loaders.audio_cache import decode_audio
from data_loaders.stored_embeddings import save_atomically
from models.retrieval_model import RetrievalModel

INDEX_FORMAT = 1
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def model_fingerprint(checkpoint: Path, settings: dict) -> str:
    """sha256 of the checkpoint's bytes and of the settings that shape the embeddings (JSON, keys sorted)."""
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as handle:
        for block in iter(lambda: handle.read(2**24), b""):
            digest.update(block)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def audio_files(folder: Path) -> list[str]:
    """Paths (relative to `folder`, sorted) of the audio files below it, by suffix, case-insensitively."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")
                  if path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES)


def chunks_of(samples: torch.Tensor, chunk_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples,) -> zero-padded chunks (n, chunk_samples) and their real lengths (n,); at least one chunk."""
    count = max(1, math.ceil(len(samples) / chunk_samples))
    padded = torch.zeros(count * chunk_samples)
    padded[:len(samples)] = samples
    lengths = torch.clamp(len(samples) - torch.arange(count) * chunk_samples, min=1, max=chunk_samples)
    return padded.view(count, chunk_samples), lengths


@dataclass
class IndexReport:
    embedded: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # path -> reason


def read_index(index_file: Path) -> dict:
    """The index at `index_file`, or an error naming it."""
    try:
        index = torch.load(index_file, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"index_file={str(index_file)!r} not found: make it with `cmd_index`") from None
    except Exception as error:  # truncated or foreign file: name it, whatever torch raised
        raise ValueError(f"index_file={str(index_file)!r} cannot be read ({type(error).__name__})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ValueError(f"index_file={str(index_file)!r} is not an index of this version: make it again with "
                         f"cmd_index")
    return index


def check_model(index: dict, fingerprint: str, index_file: Path) -> None:
    """Refuse an index that another model, or the same weights with other settings, made."""
    if index["fingerprint"] != fingerprint:
        raise ValueError(f"index_file={str(index_file)!r} was made by another model or other settings "
                         f"({index['model']}); index the folder again with this model, into another index_file")


@torch.no_grad()
def update_index(model: RetrievalModel, folder: Path, index_file: Path, fingerprint: str, description: str,
                 sample_rate: int, clip_samples: int, batch_size: int = 8) -> IndexReport:
    """Bring `index_file` up to date with `folder`: embed new and changed files, keep the rest, drop deleted ones."""
    previous = {}
    if index_file.is_file():
        index = read_index(index_file)
        check_model(index, fingerprint, index_file)
        previous = index["files"]
    device = next(model.parameters()).device
    report, entries = IndexReport(), {}
    for relative in tqdm(audio_files(folder), desc=f"indexing {folder}", unit="file"):
        path = folder / relative
        stat = path.stat()
        known = previous.get(relative)
        if known is not None and (known["size"], known["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
            entries[relative] = known
            report.reused.append(relative)
            continue
        try:
            samples = torch.from_numpy(decode_audio(path, sample_rate))
        except ValueError as error:
            report.unreadable[relative] = str(error)
            continue
        chunks, lengths = chunks_of(samples, clip_samples)
        windows, masks = [], []
        for first in range(0, len(chunks), batch_size):
            sequence, mask = model.encode_audio(chunks[first:first + batch_size].to(device),
                                                lengths[first:first + batch_size].to(device))
            windows.append(sequence.float().cpu())
            masks.append(mask.cpu())
        entries[relative] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "seconds": len(samples) / sample_rate,
                             "windows": torch.cat(windows), "masks": torch.cat(masks)}
        report.embedded.append(relative)
    report.dropped = sorted(set(previous) - set(entries))
    index_file.parent.mkdir(parents=True, exist_ok=True)
    save_atomically({"format": INDEX_FORMAT, "fingerprint": fingerprint, "model": description, "folder": str(folder),
                     "files": entries}, index_file)
    return report


@torch.no_grad()
def file_scores(model: RetrievalModel, index: dict, queries: list[str]) -> tuple[list[str], torch.Tensor]:
    """The indexed files and every query's score against each (queries, files): the best of the file's chunks,
    each scored by the model's pooling (per query and chunk for TAP)."""
    files = list(index["files"])
    if not files:
        raise ValueError("the index holds no files")
    device = next(model.parameters()).device
    windows = torch.cat([index["files"][name]["windows"] for name in files]).to(device)
    masks = torch.cat([index["files"][name]["masks"] for name in files]).to(device)
    owner = torch.cat([torch.full((len(index["files"][name]["windows"]),), row) for row, name in enumerate(files)])
    chunk_scores = model.pooling.score(model.encode_text(queries), windows, masks).float().cpu()
    best = torch.full((len(queries), len(files)), -math.inf)
    best.scatter_reduce_(1, owner.expand(len(queries), -1), chunk_scores, reduce="amax")
    return files, best


def top_files(files: list[str], scores: torch.Tensor, top_k: int) -> list[list[tuple[str, float]]]:
    """Per query, its `top_k` files with their scores, best first."""
    values, columns = scores.topk(min(top_k, len(files)), dim=1)
    return [[(files[column], float(value)) for value, column in zip(row_values, row_columns)]
            for row_values, row_columns in zip(values.tolist(), columns.tolist())]
