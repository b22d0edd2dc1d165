import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from data_loaders.clotho_v2 import (ClipCaptions, check_audio_files, read_augmented_captions, read_captions,
                                    read_metadata)
from tests.conftest import SHARED, TINY_SPLITS

PHI4_CSV = SHARED / "data" / "clotho_captions_development_plus_phi_generated.csv"


def test_official_layout_is_parsed(data_dir):
    folder = data_dir / "clotho_demo"
    clips = read_captions(folder / "clotho_captions_development.csv")
    assert len(clips) == TINY_SPLITS["development"]
    assert all(len(clip.captions) == 5 and all(clip.captions) for clip in clips)
    check_audio_files(clips, folder / "development", folder / "clotho_captions_development.csv")
    info = soundfile.info(str(folder / "development" / clips[0].file_name))
    assert info.samplerate == 44100 and 15 <= info.duration <= 30


def test_metadata_is_read_as_iso_8859_1(data_dir):
    path = data_dir / "clotho_demo" / "clotho_metadata_evaluation.csv"
    assert "Jürgen".encode("ISO-8859-1") in path.read_bytes()
    keywords = read_metadata(path)
    assert len(keywords) == TINY_SPLITS["evaluation"] and all(keywords.values())


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return path


def test_caption_errors_name_file_and_row(tmp_path):
    header = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
    path = write_csv(tmp_path / "c.csv", [header, ["a.wav", "x", "y", "z", "w", "v"], ["b.wav", "x", "", "z", "w", "v"]])
    with pytest.raises(ValueError, match=r"c.csv, row 3 \(b.wav\): empty caption_2"):
        read_captions(path)
    path = write_csv(tmp_path / "d.csv", [header[:4], ["a.wav", "x", "y", "z"]])
    with pytest.raises(ValueError, match="missing column.*caption_4, caption_5"):
        read_captions(path)
    with pytest.raises(FileNotFoundError, match="captions CSV not found: .*nowhere.csv.*make download-dataset"):
        read_captions(tmp_path / "nowhere.csv")


@pytest.mark.parametrize("name", ["clotho_captions_development.csv", "clotho_metadata_development.csv"])
def test_spreadsheet_exports_with_a_byte_order_mark_are_read(data_dir, name):
    path = data_dir / "clotho_demo" / name
    reader = read_captions if "captions" in name else read_metadata
    plain = reader(path)
    text = path.read_bytes().decode("utf-8" if "captions" in name else "ISO-8859-1")
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # what a spreadsheet's "CSV UTF-8" export writes
    assert reader(path) == plain


def test_captions_that_are_not_utf8_are_named(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("file_name,caption_1\nj.wav,J\u00fcrgen speaks\n".encode("ISO-8859-1"))
    with pytest.raises(ValueError, match=r"latin.csv: not utf-8 text \(byte 27: b'\\xfc'\); save it as UTF-8"):
        read_captions(path, captions_per_clip=1)


def test_missing_audio_is_named(data_dir):
    folder = data_dir / "clotho_demo"
    clips = read_captions(folder / "clotho_captions_validation.csv")
    (folder / "validation" / clips[1].file_name).unlink()
    with pytest.raises(FileNotFoundError, match=f"names 1 audio file.*{clips[1].file_name}"):
        check_audio_files(clips, folder / "validation", folder / "clotho_captions_validation.csv")


def test_published_phi4_csv_gives_ten_captions_per_clip():
    augmented = read_captions(PHI4_CSV, captions_per_clip=10)
    assert len(augmented) == 3839
    development = [ClipCaptions(clip.file_name, clip.captions[:5]) for clip in augmented]
    merged = read_augmented_captions(PHI4_CSV, development)
    assert [clip.file_name for clip in merged] == [clip.file_name for clip in development]
    assert all(len(clip.captions) == 10 for clip in merged)
    assert merged[0].captions[:5] == development[0].captions


def test_phi4_csv_must_cover_the_split_exactly(tmp_path):
    augmented = read_captions(PHI4_CSV, captions_per_clip=10)[:3]
    development = [ClipCaptions(clip.file_name, clip.captions[:5]) for clip in augmented]
    with pytest.raises(ValueError, match=r"row 5: .* is not in the development split"):
        read_augmented_captions(PHI4_CSV, development)
    partial = tmp_path / "partial.csv"
    with open(PHI4_CSV, encoding="utf-8") as source:
        partial.write_text("".join(source.readlines()[:3]), encoding="utf-8")
    with pytest.raises(ValueError, match="no augmented captions for 1 development clip"):
        read_augmented_captions(partial, development)
    with pytest.raises(FileNotFoundError, match="augmented captions CSV not found"):
        read_augmented_captions(tmp_path / "absent.csv", development)


def test_ten_caption_loader_on_the_published_csv_with_stand_in_audio(tmp_path):
    from sacred import Experiment

    from data_loaders.clotho_v2 import clotho_v2
    from data_loaders.data_loader import get_dataset

    folder = tmp_path / "clotho_v2"
    (folder / "development").mkdir(parents=True)
    published = read_captions(PHI4_CSV, captions_per_clip=10)
    with open(folder / "clotho_captions_development.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["file_name"] + [f"caption_{i}" for i in range(1, 6)],
                                      *[[clip.file_name, *clip.captions[:5]] for clip in published]])
    shutil.copy(PHI4_CSV, folder / PHI4_CSV.name)
    silence = np.zeros(441, dtype=np.int16)
    for clip in published:
        soundfile.write(folder / "development" / clip.file_name, silence, 44100)

    experiment = Experiment("ten_captions", ingredients=[clotho_v2])

    @experiment.main
    def build():
        dataset = get_dataset("train")
        return len(dataset), [dataset.samples[i][1] for i in range(10)], dataset[12]["caption"]

    run = experiment.run(config_updates={"clotho_v2": {"add_phi4_captions": True},
                                         "directories": {"data_dir": str(tmp_path)}}, options={"--loglevel": "ERROR"})
    size, first_clip_captions, twelfth = run.result
    assert size == 10 * len(published)
    assert first_clip_captions == list(published[0].captions)
    assert twelfth == published[1].captions[2]


def test_a_generated_data_set_is_the_same_for_the_same_seed_text_model_included(tmp_path):
    # The demo's tiny RoBERTa was initialised from whatever state torch's global generator was in: every generated
    # copy of the demo data trained to another figure (make demo on three fresh copies: 0.36, 0.43, 0.38).
    import hashlib

    from data_loaders.demo_data import generate_demo_dataset

    def contents(folder: Path) -> dict[str, str]:
        return {str(path.relative_to(folder)): hashlib.md5(path.read_bytes()).hexdigest()
                for path in sorted(folder.rglob("*")) if path.is_file()}

    torch.manual_seed(1)
    first = contents(generate_demo_dataset(tmp_path / "first", TINY_SPLITS, seed=3))
    after_generating = torch.rand(2)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(2), after_generating)  # the caller's random numbers are untouched
    again = contents(generate_demo_dataset(tmp_path / "again", TINY_SPLITS, seed=3))
    assert again == first
    other = contents(generate_demo_dataset(tmp_path / "other", TINY_SPLITS, seed=4))
    assert other["roberta-tiny/model.safetensors"] != first["roberta-tiny/model.safetensors"]


def test_a_split_without_clips_is_refused_before_anything_is_written(tmp_path):
    from data_loaders.demo_data import generate_demo_dataset

    with pytest.raises(ValueError, match="validation would hold no clip"):
        generate_demo_dataset(tmp_path / "demo", {"development": 2, "validation": 0, "evaluation": 1})
    assert list(tmp_path.iterdir()) == []
