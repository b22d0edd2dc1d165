"""PNG figures: written whole or not at all; the stage-1 lever chart from the benchmark's JSON lines."""
import json

import pytest

from benchmarks.bench_stage1 import bar_label, lever_rows, plot_levers
from utils.figures import logged_curves, pyplot, save_figure, save_training_curves

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_figure_that_fails_to_render_leaves_no_file(tmp_path):
    figure, axis = pyplot().subplots()
    axis.plot([0, 1], [0, 1])
    save_figure(figure, tmp_path / "line.png")
    assert (tmp_path / "line.png").read_bytes()[:8] == PNG
    figure, axis = pyplot().subplots()
    axis.set_title("$\\unknowncommand$")  # mathtext raises while the file is being written
    with pytest.raises(ValueError):
        save_figure(figure, tmp_path / "broken.png")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["line.png"]


def test_lever_chart_takes_the_timed_rows_of_a_step_json(tmp_path):
    common = {"config": "baseline", "machine": "NVIDIA H100", "batch": 16}
    rows = [{**common, "lever": "published", "samples_per_second": 70.0, "mfu": 0.055, "peak_memory_gib": 26.1},
            {**common, "lever": "published", "eval_batch": 64, "evaluation_seconds": 2.2},
            {**common, "lever": "compile", "skipped": "past --deadline 100 s"},
            {**common, "lever": "cuda_graphs", "samples_per_second": 300.0, "mfu": None, "peak_memory_gib": None}]
    source = tmp_path / "step.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    timed = lever_rows(source)
    assert [row["lever"] for row in timed] == ["published", "cuda_graphs"]
    plot_levers(timed, tmp_path / "levers.png", target=400)
    assert (tmp_path / "levers.png").read_bytes()[:8] == PNG
    assert bar_label(timed[0]) == "70.0/s, MFU 5.5%, 26.1 GiB allocated"
    assert bar_label({**timed[1], "peak_memory_gib": 7.6, "peak_reserved_gib": 19.31}) == "300.0/s, 19.3 GiB reserved"
    (tmp_path / "empty.jsonl").write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(SystemExit, match="empty.jsonl: no timed lever rows"):
        lever_rows(tmp_path / "empty.jsonl")


def test_training_curves_come_from_lightnings_csv_log(tmp_path):
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,lr-AdamW/audio_encoder,step,train/loss,val/R@1,val/mAP@10\n"
                   ",0.001,9,,,\n"
                   "0,,9,3.5,,\n"
                   "0,,11,,0.1,0.2\n"
                   "1,,19,2.25,,\n"
                   "1,,23,,0.3,0.4\n")
    loss, validation = logged_curves(log)
    assert loss == [(9, 3.5), (19, 2.25)]
    assert validation == {"val/R@1": [(1, 0.1), (2, 0.3)], "val/mAP@10": [(1, 0.2), (2, 0.4)]}  # epochs from 1
    assert save_training_curves(log, tmp_path / "curves.png").read_bytes()[:8] == PNG
    log.write_text("epoch,step,val/mAP@10\n0,11,0.2\n")  # fewer steps than log_every_n_steps: no loss logged
    assert logged_curves(log) == ([], {"val/mAP@10": [(1, 0.2)]})
    assert save_training_curves(log, tmp_path / "short.png").read_bytes()[:8] == PNG
