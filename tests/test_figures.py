"""PNG figures: written whole or not at all; the stage-1 lever and fit charts from the benchmark's JSON lines."""
import json

import pytest

from benchmarks.bench_stage1 import (axis_end_for_labels, bar_label, fit_label, fit_name, fit_rows, lever_rows,
                                     plot_fits, plot_levers)
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


def test_fit_chart_takes_the_fit_rows_of_several_files_named_by_their_source(tmp_path):
    fit = {"command": "fit", "machine": "NVIDIA H200, torch 2.11.0+cu130", "time/train_samples_per_second": 436.46,
           "memory/peak_gpu_reserved_gib": 15.14, "projected_published_minutes": 20.83,
           "settings": ["fast_gpu", "cuda_graph_step=True", "compile_cache=/tmp/gpu/compile_cache.bin"]}
    (tmp_path / "h200-2026-11-27").mkdir()
    first, second = tmp_path / "h200-2026-11-27" / "fit.jsonl", tmp_path / "h200-2026-11-27" / "fit_rerun.jsonl"
    first.write_text(json.dumps({"command": "step", "lever": "published", "samples_per_second": 70.0}) + "\n"
                     + json.dumps(fit) + "\n")
    second.write_text(json.dumps({**fit, "settings": [], "time/train_samples_per_second": 72.7,
                                  "memory/peak_gpu_reserved_gib": None, "projected_published_minutes": None}) + "\n")
    rows = fit_rows([first, second])
    assert [row["time/train_samples_per_second"] for row in rows] == [436.46, 72.7]
    assert fit_name(rows[0]) == "h200-2026-11-27/fit, H200\nfast_gpu cuda_graph_step=True"
    assert fit_name(rows[1]) == "h200-2026-11-27/fit_rerun, H200\npublished settings"
    assert fit_label(rows[0]) == "436.5/s, 15.1 GiB reserved, 20 epochs 20.8 min"
    assert fit_label(rows[1]) == "72.7/s"
    plot_fits(rows, tmp_path / "fits.png", target=400)
    assert (tmp_path / "fits.png").read_bytes()[:8] == PNG
    first.write_text(json.dumps({"command": "step", "lever": "published", "samples_per_second": 70.0}) + "\n")
    with pytest.raises(SystemExit, match="fit.jsonl: no fit rows"):
        fit_rows([first])


def test_each_bars_label_ends_inside_the_axes():
    figure, axis = pyplot().subplots(figsize=(11, 3))
    rates = [436.5, 72.7, 344.8]
    texts = [axis.text(rate, position, "  436.5/s, 15.1 GiB reserved, 20 epochs 20.8 min", fontsize="small")
             for position, rate in enumerate(rates)]
    axis.set_xlim(0, axis_end_for_labels(figure, axis, rates, texts, minimum=480))
    figure.canvas.draw()
    axes_right = axis.get_window_extent().x1
    assert all(text.get_window_extent().x1 <= axes_right for text in texts)
    assert axis.get_xlim()[1] > 480  # the labels needed more room than the bars
    pyplot().close(figure)


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
