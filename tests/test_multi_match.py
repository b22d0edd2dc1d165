"""DCASE 2025 multi-match evaluation: AP@k with several relevant clips, the annotation CSV, and the test logs."""
import csv
from pathlib import Path

import pytest
import torch

from data_loaders.clotho_v2 import ClipCaptions, load_multi_match, read_captions, read_multi_match
from tests.conftest import RESULT_KEYS, SHARED
from tests.test_experiment import run_demo
from utils.metrics import MultiMatch, multi_match_average_precision

REAL_FILE = SHARED / "data" / "dcase2025_task6_metadata_eval.csv"


def test_average_precision_by_hand():
    scores = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.7])  # ranking: clip 0, 2, 4, 3, 1
    relevant = torch.tensor([4, 2])  # ranks 3 and 2
    assert multi_match_average_precision(scores, relevant, 16).item() == pytest.approx(0.5 * (1 / 2 + 2 / 3))
    assert multi_match_average_precision(scores, relevant, 2).item() == pytest.approx(0.5 * (1 / 2))
    assert multi_match_average_precision(scores, torch.tensor([0]), 16).item() == 1.0
    assert multi_match_average_precision(scores, torch.tensor([1]), 4).item() == 0.0  # rank 5 > 4
    tied = torch.tensor([0.5, 0.5, 0.1])
    assert multi_match_average_precision(tied, torch.tensor([1]), 16).item() == 0.5  # ties count against


def test_mean_over_queries_picks_the_query_rows_of_the_split():
    scores = torch.tensor([[0.0, 0.0, 0.0],  # caption row 0: not a query
                           [0.9, 0.8, 0.1],  # query 1: relevant clips 1, 2 -> ranks 2, 3
                           [0.2, 0.9, 0.3]])  # query 2: relevant clip 1 -> rank 1
    annotations = MultiMatch(torch.tensor([1, 2]), (torch.tensor([1, 2]), torch.tensor([1])))
    expected = (0.5 * (1 / 2 + 2 / 3) + 1.0) / 2
    assert annotations.metrics(scores) == pytest.approx({"mAP@16": expected, "mAP@10": expected})


def test_the_real_dcase2025_file_reads_as_published():
    rows = read_multi_match(REAL_FILE)
    assert len(rows) == 1037
    counts = [len(files) for _, files in rows]
    assert (min(counts), max(counts), round(sum(counts) / len(counts), 1)) == (1, 12, 3.0)
    query, files = rows[0]
    assert query == "A Bicycle rides past people walking, while birds are singing."
    assert files == ("bird_in_rain.wav", "woodsbirds.wav", "Stream Honiton.wav", "bridge.wav")
    assert any("Pensol - le Moulin cours d&#39;eau.wav" in files for _, files in rows)  # names as Clotho writes them


def stand_in_split(rows):
    """Clips for every file the rows name, each query a caption of its first relevant clip."""
    names = sorted({name for _, files in rows for name in files})
    captions = {name: [] for name in names}
    for query, files in rows:
        captions[files[0]].append(query)
    return [ClipCaptions(name, tuple((captions[name] + [f"filler {i} of {name}" for i in range(5)])[:5]))
            for name in names]


def test_annotations_map_to_caption_rows_and_clip_indices_of_the_split(tmp_path):
    rows = read_multi_match(REAL_FILE)[:6]
    clips = stand_in_split(rows)
    annotations = load_multi_match(clips, multi_match_file=str(write_rows(tmp_path / "multi.csv", rows)))
    flat = [caption for clip in clips for caption in clip.captions]
    names = [clip.file_name for clip in clips]
    assert [flat[row] for row in annotations.query_rows.tolist()] == [query for query, _ in rows]
    assert [[names[i] for i in clip_rows.tolist()] for clip_rows in annotations.relevant] == [list(f) for _, f in rows]
    assert load_multi_match(clips, multi_match_file=None) is None


@pytest.mark.parametrize("damage, message", [
    ("query", r"row 2: query 'a query nobody wrote' is not a caption of the test split"),
    ("file", r"row 3: file 'absent.wav' is not a clip of the test split"),
    ("literal", r"row 2: expected a query and a non-empty list of file names, got .*'\[bird_in_rain.wav\]'"),
    ("empty", r"row 2: expected a query and a non-empty list of file names"),
])
def test_annotations_that_do_not_fit_the_split_name_the_first_problem(tmp_path, damage, message):
    rows = read_multi_match(REAL_FILE)[:3]
    clips = stand_in_split(rows)
    path = write_rows(tmp_path / "multi.csv", rows)
    text = path.read_text(encoding="utf-8")
    first_query, first_files = rows[0]
    if damage == "query":
        text = text.replace(first_query, "a query nobody wrote")
    elif damage == "file":
        text = text.replace(repr(list(rows[1][1])), repr(list(rows[1][1]) + ["absent.wav"]))
    elif damage == "literal":
        text = text.replace(repr(list(first_files)), "[" + first_files[0] + "]")
    elif damage == "empty":
        text = text.replace(repr(list(first_files)), "[]")
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_multi_match(clips, multi_match_file=str(path))


def test_test_split_logs_multi_match_metrics_and_bad_annotations_stop_before_training(data_dir):
    folder = data_dir / "clotho_demo"
    clips = read_captions(folder / "clotho_captions_evaluation.csv")
    rows = [(clips[0].captions[1], (clips[0].file_name, clips[2].file_name)),
            (clips[3].captions[0], (clips[3].file_name,))]
    write_rows(folder / "multi.csv", rows)
    run = run_demo(data_dir, clotho_v2__multi_match_file="multi.csv")  # relative to the dataset folder
    assert set(run.result) == RESULT_KEYS | {"test_multi/mAP@16", "test_multi/mAP@10"}
    assert 0 < run.result["test_multi/mAP@16"] <= 1
    metrics_csv = next((Path(run.info["run_folder"]) / "logs").glob("*/metrics.csv")).read_text()
    assert "test_multi/mAP@16" in metrics_csv and "test_best_multi/mAP@10" in metrics_csv
    write_rows(folder / "multi.csv", [("a caption of another split", (clips[0].file_name,))])
    runs_before = sorted((data_dir / "runs").iterdir())
    with pytest.raises(ValueError, match="query 'a caption of another split' is not a caption of the test split"):
        run_demo(data_dir, clotho_v2__multi_match_file="multi.csv")
    assert sorted((data_dir / "runs").iterdir()) == runs_before


def write_rows(path: Path, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["query", "audio_filenames"], *[[q, repr(list(files))] for q, files in rows]])
    return path
