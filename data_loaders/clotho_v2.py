"""Clotho v2.1 in its official layout: caption and metadata CSVs beside one audio folder per split.

The `clotho_v2` ingredient names the dataset folder and what to read from it.
"""
from __future__ import annotations

import ast
import codecs
import csv
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from sacred import Ingredient

from utils.directories import directories, get_data_dir
from utils.metrics import MultiMatch

clotho_v2 = Ingredient("clotho_v2", ingredients=[directories])

# Our split names -> Clotho's folder/CSV names.
SPLITS = {"train": "development", "val": "validation", "test": "evaluation"}
CAPTIONS_PER_CLIP = 5
PHI4_CAPTIONS_FILE = "clotho_captions_development_plus_phi_generated.csv"
GET_DATA_HINT = ("get Clotho v2.1 with `make download-dataset` (see README, 'Data'), or run the demo "
                 "generator: `python -m data_loaders.demo_data`")


@clotho_v2.config
def clotho_v2_config():
    folder_name = "clotho_v2"  # below directories.data_dir
    add_phi4_captions = False  # train on the 10-caption CSV (5 Clotho + 5 Phi-4 captions per clip)
    phi4_captions_file = PHI4_CAPTIONS_FILE  # relative to the dataset folder, or absolute
    clip_seconds = 30  # clips are cropped or zero-padded to this length
    sample_rate = 32000  # PaSST's rate; the HDF5 cache stores audio at this rate
    multi_match_file = None  # DCASE 2025 multi-match annotations of the test split (absolute, or below the dataset)


@dataclass(frozen=True)
class ClipCaptions:
    file_name: str
    captions: tuple[str, ...]


def captions_csv(folder: Path, clotho_split: str) -> Path:
    return folder / f"clotho_captions_{clotho_split}.csv"


def metadata_csv(folder: Path, clotho_split: str) -> Path:
    return folder / f"clotho_metadata_{clotho_split}.csv"


def csv_rows(path: Path, encoding: str) -> csv.DictReader:
    """A CSV reader that accepts a UTF-8 byte-order mark (spreadsheet exports write one) in any encoding."""
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw, encoding = raw[len(codecs.BOM_UTF8):], "utf-8"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not {encoding} text (byte {error.start}: {raw[error.start:error.start + 1]!r}); "
                         f"save it as UTF-8") from None
    return csv.DictReader(io.StringIO(text, newline=""))


def read_captions(path: Path, captions_per_clip: int = CAPTIONS_PER_CLIP) -> list[ClipCaptions]:
    """Rows of `file_name, caption_1..caption_N`, in file order; errors name the file and row."""
    if not path.is_file():
        raise FileNotFoundError(f"captions CSV not found: {path}; {GET_DATA_HINT}")
    expected = ["file_name"] + [f"caption_{i}" for i in range(1, captions_per_clip + 1)]
    reader = csv_rows(path, "utf-8")
    missing = [column for column in expected if column not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(expected)}")
    clips, seen = [], set()
    for row_number, row in enumerate(reader, start=2):
        file_name = (row["file_name"] or "").strip()
        if not file_name:
            raise ValueError(f"{path}, row {row_number}: empty file_name")
        if file_name in seen:
            raise ValueError(f"{path}, row {row_number}: {file_name!r} appears twice")
        captions = tuple((row[column] or "").strip() for column in expected[1:])
        empty = [column for column, caption in zip(expected[1:], captions) if not caption]
        if empty:
            raise ValueError(f"{path}, row {row_number} ({file_name}): empty {', '.join(empty)}")
        seen.add(file_name)
        clips.append(ClipCaptions(file_name, captions))
    if not clips:
        raise ValueError(f"{path}: no rows")
    return clips


def read_metadata(path: Path) -> dict[str, list[str]]:
    """file_name -> keywords, from Clotho's ISO-8859-1 metadata CSV (keywords are ';'-separated)."""
    if not path.is_file():
        raise FileNotFoundError(f"metadata CSV not found: {path}; {GET_DATA_HINT}")
    reader = csv_rows(path, "ISO-8859-1")
    for column in ("file_name", "keywords"):
        if column not in (reader.fieldnames or []):
            raise ValueError(f"{path}: missing column {column!r}")
    return {row["file_name"].strip(): [k.strip() for k in (row["keywords"] or "").split(";") if k.strip()]
            for row in reader}


def read_augmented_captions(path: Path, development: list[ClipCaptions]) -> list[ClipCaptions]:
    """The 10-caption development CSV (Clotho's five, then five generated), checked against the split.

    Every development clip needs a row and every row a development clip, so that a stale or
    partial generator output cannot silently shrink or pollute the training set.
    """
    if not path.is_file():
        raise FileNotFoundError(f"augmented captions CSV not found: {path} (clotho_v2.phi4_captions_file); "
                                f"generate it with `python -m experiments.generate_captions_phi4` or download "
                                f"the published one (README, 'Overcaptioning')")
    augmented = read_captions(path, captions_per_clip=2 * CAPTIONS_PER_CLIP)
    by_name = {clip.file_name: clip for clip in augmented}
    development_names = {clip.file_name for clip in development}
    for row_number, clip in enumerate(augmented, start=2):
        if clip.file_name not in development_names:
            raise ValueError(f"{path}, row {row_number}: {clip.file_name!r} is not in the development split")
    missing = [clip.file_name for clip in development if clip.file_name not in by_name]
    if missing:
        raise ValueError(f"{path}: no augmented captions for {len(missing)} development clip(s), "
                         f"e.g. {', '.join(missing[:3])}")
    return [by_name[clip.file_name] for clip in development]


def check_audio_files(clips: list[ClipCaptions], audio_folder: Path, captions_path: Path) -> None:
    """Every caption row needs its audio: name the missing files rather than fail mid-epoch."""
    if not audio_folder.is_dir():
        raise FileNotFoundError(f"audio folder not found: {audio_folder} (for {captions_path}); {GET_DATA_HINT}")
    missing = [clip.file_name for clip in clips if not (audio_folder / clip.file_name).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{captions_path} names {len(missing)} audio file(s) missing from "
                                f"{audio_folder}: {shown}")


@clotho_v2.capture
def dataset_folder(folder_name: str) -> Path:
    folder = get_data_dir() / folder_name
    if not folder.is_dir():
        raise FileNotFoundError(f"Clotho folder not found: {folder} (directories.data_dir/clotho_v2.folder_name); "
                                f"{GET_DATA_HINT}")
    return folder


@clotho_v2.capture
def load_split(split: str, add_phi4_captions: bool, phi4_captions_file: str) -> tuple[list[ClipCaptions], Path]:
    """The clips of one split with their captions, and the split's audio folder."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choices: {', '.join(SPLITS)}")
    folder = dataset_folder()
    clotho_split = SPLITS[split]
    captions_path = captions_csv(folder, clotho_split)
    clips = read_captions(captions_path)
    if split == "train" and add_phi4_captions:
        augmented_path = Path(phi4_captions_file)
        augmented_path = augmented_path if augmented_path.is_absolute() else folder / augmented_path
        clips = read_augmented_captions(augmented_path, clips)
    audio_folder = folder / clotho_split
    check_audio_files(clips, audio_folder, captions_path)
    return clips, audio_folder


def read_multi_match(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """DCASE 2025's `query, audio_filenames` CSV (the file names a Python list literal), in file order."""
    if not path.is_file():
        raise FileNotFoundError(f"multi-match CSV not found: {path} (clotho_v2.multi_match_file)")
    reader = csv_rows(path, "utf-8")
    missing = [column for column in ("query", "audio_filenames") if column not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected query, audio_filenames")
    rows = []
    for row_number, row in enumerate(reader, start=2):
        query = (row["query"] or "").strip()
        try:
            files = ast.literal_eval(row["audio_filenames"] or "")
        except (ValueError, SyntaxError):
            files = None
        if not query or not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise ValueError(f"{path}, row {row_number}: expected a query and a non-empty list of file names, got "
                             f"{row['query']!r}, {row['audio_filenames']!r}")
        rows.append((query, tuple(files)))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


@clotho_v2.capture
def load_multi_match(clips: list[ClipCaptions], multi_match_file: str | None) -> MultiMatch | None:
    """The multi-match annotations for the test split's `clips`, or None if none are configured; every query must
    be a caption of the split and every file one of its clips (the first that is not is named)."""
    if multi_match_file is None:
        return None
    path = Path(multi_match_file).expanduser()
    path = path if path.is_absolute() else dataset_folder() / path
    caption_rows: dict[str, int] = {}
    for row, caption in enumerate(caption for clip in clips for caption in clip.captions):
        caption_rows.setdefault(caption.strip(), row)
    clip_rows = {clip.file_name: row for row, clip in enumerate(clips)}
    query_rows, relevant = [], []
    for row_number, (query, files) in enumerate(read_multi_match(path), start=2):
        if query not in caption_rows:
            raise ValueError(f"{path}, row {row_number}: query {query!r} is not a caption of the test split")
        absent = [name for name in files if name not in clip_rows]
        if absent:
            raise ValueError(f"{path}, row {row_number}: file {absent[0]!r} is not a clip of the test split")
        query_rows.append(caption_rows[query])
        relevant.append(torch.tensor([clip_rows[name] for name in files]))
    return MultiMatch(torch.tensor(query_rows), tuple(relevant))
