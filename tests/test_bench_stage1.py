"""The stage-1 speed benchmark measures the workload the published training runs, and counts its FLOPs so."""
import argparse
import csv
import gc
import gzip
import json
import weakref
from functools import partial
from pathlib import Path

import pytest
import torch

import benchmarks.bench_stage1 as bench_stage1
from benchmarks.bench_stage1 import (CONFIGS, LEVERS, PUBLISHED, build_model, caption_vocabulary, counting_totals,
                                     draws_differ, every_window_total, model_tflop_per_sample,
                                     projected_published_run, random_batch, replays_draw_afresh, run_experiment,
                                     training_step)
from benchmarks.kernel_breakdown import breakdown
from data_loaders.demo_data import write_text_model
from experiments.ex_dcase24 import ex
from experiments.retrieval_module import recorded_step_loss
from experiments.tracking import PROFILE_TRACE
from models.audio.passt import SAMPLE_RATE
from tests.graph_stand_in import CpuGraph
from utils.step_graph import RecordedStep


@pytest.mark.parametrize("config_name, named_configs", [("baseline", []), ("demo", ["demo"])])
def test_the_benchmark_trains_with_the_experiments_patchout(config_name, named_configs):
    config = ex.run("print_config", named_configs=named_configs, options={"--loglevel": "ERROR"}).config
    patchout = config["audio_features"]["model_config"]
    assert CONFIGS[config_name]["patchout"] == (patchout["s_patchout_t"], patchout["s_patchout_f"])


def test_model_flops_count_only_the_patches_patchout_keeps(tmp_path: Path):
    vocabulary = caption_vocabulary(50)
    torch.manual_seed(0)
    text_folder = write_text_model(tmp_path, vocabulary, **CONFIGS["demo"]["text"])
    batches = [random_batch(4, CONFIGS["demo"]["crop_seconds"], vocabulary, torch.Generator().manual_seed(0), "cpu")]
    with_patchout = dict(CONFIGS["demo"], patchout=(2, 1))
    network = build_model(with_patchout, text_folder, "cpu", PUBLISHED).audio_encoder.network
    assert (network.s_patchout_t, network.s_patchout_f) == (2, 1)
    full, kept = (model_tflop_per_sample(config, text_folder, batches, "cpu")
                  for config in (CONFIGS["demo"], with_patchout))
    assert kept < 0.9 * full
    assert model_tflop_per_sample(with_patchout, text_folder, batches, "cpu") == kept  # as many patches every draw


def test_the_fit_reports_an_unprofiled_epoch_and_traces_steps_of_the_last(data_dir: Path):
    """`fit --profile-steps` through the command line: 30 captions in batches of 1, 2 epochs; the last epoch's batches
    10-12 are traced into the run folder, whole, and the figures reported are the first epoch's. The run's output
    is appended to the log as it comes."""
    log = data_dir / "out" / "fit_run.log"
    log.parent.mkdir()
    log.write_text("an earlier run\n")
    run_seconds, per_epoch, run_folder = run_experiment(
        data_dir, ["demo", f"directories.data_dir={data_dir}", "max_epochs=2", "data_loader.batch_size=1",
                   "data_loader.n_workers=0", "profile_steps=3"], log)
    earlier, header, *output = log.read_text().splitlines()
    assert earlier == "an earlier run" and header.endswith("ex_dcase24 with demo directories.data_dir="
                                                           f"{data_dir} max_epochs=2 data_loader.batch_size=1 "
                                                           "data_loader.n_workers=0 profile_steps=3")
    assert any("Completed after" in line for line in output)  # Sacred's last line, on stderr
    with gzip.open(run_folder / PROFILE_TRACE, "rt") as handle:
        events = json.load(handle)["traceEvents"]
    assert sum(event.get("name", "").startswith("Optimizer.step#AdamW.step") for event in events) == 3
    assert not list(run_folder.glob(".*partial*"))
    with open(next(run_folder.glob("logs/*/metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    profiled = [row["epoch"] for row in rows if row["time/profiled_step_ms"]]
    rates = {row["epoch"]: float(row["time/train_samples_per_second"]) for row in rows
             if row["time/train_samples_per_second"]}
    assert profiled == ["1"] and per_epoch[1]["time/profiled_step_ms"] > 0 and sorted(per_epoch) == [0, 1]
    assert per_epoch[0]["time/train_samples_per_second"] == rates["0"] != rates["1"]
    assert all(figures["time/checkpoint_seconds"] > 0 for figures in per_epoch.values())
    assert 0 < projected_published_run(per_epoch, run_seconds, 0, 30)["one_time_seconds"] < run_seconds
    assert breakdown(run_folder / PROFILE_TRACE, 3, 1.0) == f"no GPU work in {PROFILE_TRACE}\n"


def test_the_published_run_is_projected_with_its_checkpoint_writes_and_one_time_costs():
    """A 2-epoch benchmark of 1,000 captions per epoch in 100 s; the second epoch at 200 captions/s with a 3-s
    validation, the costliest checkpoint writes 4 s (epoch 1, which improved validation and wrote two)."""
    per_epoch = {0: {"time/train_samples_per_second": 100.0, "time/validation_seconds": 2.0,
                     "time/checkpoint_seconds": 1.0},
                 1: {"time/train_samples_per_second": 200.0, "time/validation_seconds": 3.0,
                     "time/checkpoint_seconds": 4.0}}
    projected = projected_published_run(per_epoch, 100.0, report_epoch=1, development_captions=1000)
    assert projected["checkpoint_seconds_per_epoch"] == 4.0
    assert projected["one_time_seconds"] == pytest.approx(100 - 2 * (1000 / 200 + 3 + 4))
    epochs = 20 * (19195 / 200 + 3 + 4)
    assert projected["projected_published_minutes"] == pytest.approx((76 + epochs + 3) / 60)  # + the test pass


@pytest.mark.parametrize("lever", ["published", "on_device"])  # patchout drawn by hear21passt, and on the device
def test_fresh_patchout_draws_are_told_from_replayed_ones(tmp_path: Path, monkeypatch, lever):
    vocabulary = caption_vocabulary(50)
    torch.manual_seed(0)
    text_folder = write_text_model(tmp_path, vocabulary, **CONFIGS["demo"]["text"])
    batch = random_batch(2, CONFIGS["demo"]["crop_seconds"], vocabulary, torch.Generator().manual_seed(0), "cpu")
    settings = LEVERS[lever]
    assert draws_differ(build_model(dict(CONFIGS["demo"], patchout=(2, 1)), text_folder, "cpu", settings), settings,
                        batch, "cpu")
    assert not draws_differ(build_model(CONFIGS["demo"], text_folder, "cpu", settings), settings, batch, "cpu")
    replayed = torch.randperm(64)  # what a CUDA graph replaying its recorded draws would hand out every time
    monkeypatch.setattr(torch, "randperm", lambda size, **options: replayed[replayed < size].to(options.get("device")))
    assert not draws_differ(build_model(dict(CONFIGS["demo"], patchout=(2, 1)), text_folder, "cpu", settings),
                            settings, batch, "cpu")


def test_the_warm_up_meets_every_window_total_a_batch_can_hold(tmp_path: Path):
    """Batch 16 of 15-30 s clips in 10-s windows holds 32-48 real windows; each total needs its own CUDA graph."""
    config = dict(CONFIGS["demo"], window_seconds=10, crop_seconds=None, batch_size=16)  # the baseline's windows
    vocabulary = caption_vocabulary(50)
    text_folder = write_text_model(tmp_path, vocabulary, **config["text"])
    model = build_model(config, text_folder, "cpu", PUBLISHED)
    generator = torch.Generator().manual_seed(0)
    batches = [random_batch(16, None, vocabulary, generator, "cpu", seconds) for seconds in every_window_total(config)]
    assert all(15 * SAMPLE_RATE <= batch["host_length"].min() and batch["host_length"].max() <= 30 * SAMPLE_RATE
               for batch in batches)
    totals: set[int] = set()
    assert list(counting_totals(model, iter(batches), totals)) == batches
    assert sorted(totals) == list(range(32, 49))
    assert len(every_window_total(CONFIGS["demo"])) == 1  # 5-s crops in 5-s windows: one total


def test_autotune_differs_from_the_cuda_graph_step_in_its_compile_mode_alone():
    """AUTOTUNE=1 times these two against each other; `real_windows_graphs`, listed between them, must not leak in."""
    changed = {key for key in LEVERS["cuda_graphs"] if LEVERS["cuda_graphs"][key] != LEVERS["max_autotune"][key]}
    assert changed == {"compile"}


def test_the_recorded_step_differs_from_the_cuda_graph_step_in_how_it_replays_alone():
    changed = {key for key in LEVERS["cuda_graphs"] if LEVERS["cuda_graphs"][key] != LEVERS["recorded_step"][key]}
    assert changed == {"compile", "recorded_step"}
    assert LEVERS["recorded_step"]["compile"] == "default"  # the encoders' own graphs cannot nest in the step's


def test_replays_of_the_recorded_step_are_told_apart_by_their_draws(tmp_path: Path, monkeypatch):
    """Patchout and the mel band edges draw afresh at every step; a replay that repeated its recording's draws
    would give the same loss twice. Learning rate 0: the weights stay as they were."""
    vocabulary = caption_vocabulary(50)
    torch.manual_seed(0)
    text_folder = write_text_model(tmp_path, vocabulary, **CONFIGS["demo"]["text"])
    batch = random_batch(2, CONFIGS["demo"]["crop_seconds"], vocabulary, torch.Generator().manual_seed(0), "cpu")
    settings = {**LEVERS["recorded_step"], "compile": None}  # eager on the CPU, which records nothing anyway
    model = build_model(dict(CONFIGS["demo"], patchout=(2, 1)), text_folder, "cpu", settings)
    weights = [parameter.detach().clone() for parameter in model.parameters()]
    recorded = RecordedStep(partial(recorded_step_loss, model), warmup_steps=1)
    assert replays_draw_afresh(model, recorded, batch, "cpu", settings["precision"])
    assert all(torch.equal(before, after) for before, after in zip(weights, model.parameters()))
    replayed = torch.randperm(64)
    monkeypatch.setattr(torch, "randperm", lambda size, **options: replayed[replayed < size].to(options.get("device")))
    monkeypatch.setattr(torch, "randint", lambda high, size, **options: torch.full(size, high // 2, **options))
    assert not replays_draw_afresh(model, recorded, batch, "cpu", settings["precision"])


def test_the_step_benchmark_replays_the_recorded_step_again_after_its_draws_check(tmp_path: Path, cpu_graphs):
    """STEP=1's order, through the CPU stand-in for the graph: the recorded step timed (warm-up, recording,
    replays), then `draws_differ`, which sets every gradient to None, then `replays_draw_afresh`, which replays
    again. Its replays must find their gradients (this stopped the benchmark, on a GPU, before its row)."""
    vocabulary = caption_vocabulary(50)
    torch.manual_seed(0)
    text_folder = write_text_model(tmp_path, vocabulary, **CONFIGS["demo"]["text"])
    settings = {**LEVERS["recorded_step"], "compile": None}  # eager: what is checked here is the order of calls
    model = build_model(dict(CONFIGS["demo"], patchout=(2, 1)), text_folder, "cpu", settings)
    recorded = RecordedStep(partial(recorded_step_loss, model), warmup_steps=1)
    generator, optimizer = torch.Generator().manual_seed(0), torch.optim.AdamW(model.parameters())
    batches = [random_batch(2, CONFIGS["demo"]["crop_seconds"], vocabulary, generator, "cpu") for _ in range(3)]
    for batch in batches:
        training_step(model, optimizer, None, batch, "cpu", settings, recorded)
    assert CpuGraph.made == 1 and recorded.recorded
    assert draws_differ(model, settings, batches[0], "cpu")
    assert all(parameter.grad is None for parameter in model.parameters())
    assert replays_draw_afresh(model, recorded, batches[0], "cpu", settings["precision"])
    assert all(parameter.grad is gradient for parameter, gradient in recorded._recorded_gradients)


def test_each_lever_is_built_after_the_last_levers_recorded_step_is_gone(tmp_path: Path, monkeypatch):
    """Each lever's peak memory is its own: a recorded step holds its model and, on a GPU, its graph's memory pool
    (the activations of a whole step), which the next lever's peak would otherwise include."""
    monkeypatch.setitem(LEVERS, "recorded_step", {**LEVERS["recorded_step"], "compile": None})  # eager on the CPU
    recorded_steps, make_step, build = [], bench_stage1.RecordedStep, bench_stage1.build_model

    def making_step(*args, **kwargs) -> RecordedStep:
        recorded_steps.append(weakref.ref(step := make_step(*args, **kwargs)))
        return step

    def building(*args, **kwargs):
        gc.collect()
        assert [ref() for ref in recorded_steps] == [None] * len(recorded_steps)
        return build(*args, **kwargs)

    monkeypatch.setattr(bench_stage1, "RecordedStep", making_step)
    monkeypatch.setattr(bench_stage1, "build_model", building)
    bench_stage1.bench_step(argparse.Namespace(
        config="demo", device="cpu", steps=2, warmup=1, batch_size=None, levers=["recorded_step", "published"],
        evaluate_after=[], eval_batches=[16], eval_clips=4, deadline=None, profile_after=None,
        profile_file=str(tmp_path / "profile.txt"), patchout=None, json=None))
    assert len(recorded_steps) == 1


def test_a_failed_run_names_its_log_and_shows_its_end(data_dir: Path):
    log = data_dir / "experiment.log"
    with pytest.raises(SystemExit) as failed:
        run_experiment(data_dir, ["demo", f"directories.data_dir={data_dir}", "max_epochs=0"])
    message = str(failed.value)
    assert f"training run failed (its output: {log})" in message and "max_epochs=0: expected >= 1" in message
    assert message.endswith(log.read_text()[-200:])
