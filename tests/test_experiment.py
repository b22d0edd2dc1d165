"""The Sacred entry point: configuration checks before work starts, and a real end-to-end demo run."""
import ast
import csv
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from experiments.ex_dcase24 import ex
from tests.conftest import RESULT_KEYS

REPO = Path(__file__).resolve().parents[1]


def run_demo(data_dir: Path, command: str | None = None, **updates):
    """`command` (None: training) of the demo on `data_dir`; keys of nested settings are joined by `__`."""
    config = {"directories": {"data_dir": str(data_dir)}, "data_loader": {"n_workers": 0}, "max_epochs": 1}
    for key, value in updates.items():
        target = config
        *parents, leaf = key.split("__")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return ex.run(command, named_configs=["demo"], config_updates=config, options={"--loglevel": "ERROR"})


def test_unreadable_audio_is_named_before_training(data_dir):
    folder = data_dir / "clotho_demo" / "validation"
    broken = sorted(folder.iterdir())[0]
    broken.write_bytes(b"RIFF garbage")
    with pytest.raises(ValueError, match=f"cannot read audio file .*{broken.name}"):
        run_demo(data_dir)
    assert not (data_dir / "runs").exists()


def test_demo_runs_end_to_end_through_the_command_line(data_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, "-m", "experiments.ex_dcase24", "with", "demo", f"directories.data_dir={data_dir}",
         "max_epochs=2", "data_loader.batch_size=8", "data_loader.n_workers=0", "audio_features.hop_length=2.5", "log_every_n_steps=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result_line = [line for line in completed.stderr.splitlines() if "Result: {" in line][-1]
    result = ast.literal_eval(result_line.split("Result: ", 1)[1])
    assert set(result) == RESULT_KEYS
    assert all(0.0 <= value <= 1.0 for value in result.values())
    assert "mAP@10" in completed.stdout and "(chance 0.5208)" in completed.stdout  # 4 test clips
    assert re.search(r"a2t_R@1 [0-9.]+ \(chance 0\.2500\)", completed.stdout)  # 5 of their 20 captions first
    assert "train/loss=" in completed.stdout  # on the bar, read when it refreshes
    (run_folder,) = (data_dir / "runs").iterdir()
    checkpoints = sorted(path.name for path in (run_folder / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(name.startswith("best-") for name in checkpoints)
    metrics_csv = next(run_folder.glob("logs/*/metrics.csv")).read_text()
    for column in ("val/mAP@10", "val/a2t_mAP@10", "train/loss", "lr-AdamW/audio_encoder",
                   "lr-AdamW/sentence_encoder"):
        assert column in metrics_csv
    assert "lr-AdamW/sentence_project" not in metrics_csv  # published projection "none" has no parameters
    assert (data_dir / "clotho_demo" / "audio_cache" / "evaluation.h5").is_file()
    for picture in ("lr_schedule.png", "training_curves.png"):
        assert (run_folder / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_print_lr_saves_the_schedule_png(tmp_path):
    output = tmp_path / "schedule.png"
    ex.run("print_lr", config_updates={"output": str(output), "audio_features": {"aggregate": "TAP"}},
           options={"--loglevel": "ERROR"})
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and output.stat().st_size > 10_000
    with pytest.raises(ValueError, match="rampdown_stop=2 comes before rampdown_start=4"):
        ex.run("print_lr", config_updates={"output": str(tmp_path / "x.png"), "rampdown_start": 4,
                                           "rampdown_stop": 2}, options={"--loglevel": "ERROR"})


PUBLISHED_TAP_COMMAND = (
    "data_loader.batch_size=16 data_loader.batch_size_eval=16 audio_features.model=passt "
    "sentence_features.model=roberta-large rampdown_type=cosine max_epochs=20 rampdown_stop=15 warmup_length=1 "
    "rampdown_start=1 train_on=clothov2 seed=409194 audio_features.aggregate=TAP "
    "tap_hyperparams.p_dropout_weights=0.1 tap_hyperparams.p_dropout_proj=0.1 audio_features.segment_length=5 "
    "audio_features.hop_length=5").split()


def test_published_tap_command_runs_with_demo_added(data_dir):
    completed = subprocess.run(
        [sys.executable, "-m", "experiments.ex_dcase24", "with", "demo", *PUBLISHED_TAP_COMMAND,
         f"directories.data_dir={data_dir}", "data_loader.n_workers=0"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Result: {" in completed.stderr
    (run_folder,) = (data_dir / "runs").iterdir()
    metrics_csv = next(run_folder.glob("logs/*/metrics.csv")).read_text()
    assert "lr-AdamW/tap" in metrics_csv
    assert metrics_csv.count("\n") > 20  # one validation row per epoch of the 20


def test_published_tap_phi4_command_trains_on_ten_captions(data_dir):
    completed = subprocess.run(
        [sys.executable, "-m", "experiments.ex_dcase24", "with", "demo", *PUBLISHED_TAP_COMMAND,
         "clotho_v2.add_phi4_captions=True", f"directories.data_dir={data_dir}", "data_loader.n_workers=0",
         "max_epochs=1", "log_every_n_steps=1"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (run_folder,) = (data_dir / "runs").iterdir()
    metrics_csv = next(run_folder.glob("logs/*/metrics.csv")).read_text()
    # 6 clips x 10 captions = 60 samples: 3 steps of 16 (drop_last) instead of 1 step with 5 captions per clip
    rows = list(csv.DictReader(io.StringIO(metrics_csv)))
    assert len({row["step"] for row in rows if row["train/loss"]}) == 3


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_the_gpu_recipes_say_the_gpu_is_missing(data_dir):
    for recipe in ("lean_single_gpu", "fast_gpu"):  # `make train`'s, and the CUDA graphs'
        with pytest.raises(RuntimeError, match="no CUDA GPU is visible .*require_gpu=False"):
            ex.run(named_configs=["demo", recipe], options={"--loglevel": "ERROR"},
                   config_updates={"directories": {"data_dir": str(data_dir)}, "min_lr": 1e-7})
    run = ex.run("print_config", named_configs=["lean_single_gpu"], options={"--loglevel": "ERROR"})
    config = run.config
    assert (config["data_loader"]["batch_size"] * config["accumulate_grad_batches"], config["max_audio_seconds"],
            config["precision"], config["lr_audio_encoder"], config["gradient_clip_val"]) == (36, 12, "bf16-mixed",
                                                                                               3e-6, 1.0)


@pytest.mark.parametrize("aggregate, pooling_class, embeds_padding, batch_seconds", [
    ("TAP", "TextAwareAttentionPooling", False, 7.5), ("TAP_own_caption", "OwnCaptionAttentionPooling", True, 30)])
def test_config_scopes_reach_the_captured_builders(data_dir, aggregate, pooling_class, embeds_padding, batch_seconds):
    # The demo's 5 s training crops are padded as far as the 3 s windows starting inside them reach (every 1.5 s:
    # 0-3 ... 4.5-7.5 s), except where the pooling attends over padding windows: then to the 30 s clip.
    from experiments.ex_dcase24 import build_audio_encoder, build_data_loaders, build_pooling

    @ex.command(unobserved=True)
    def built_components():
        encoder, pooling = build_audio_encoder(), build_pooling()
        training_batch = next(iter(build_data_loaders()["train"]))
        return (encoder.window_samples, encoder.hop_samples, encoder.embed_padding_windows, type(pooling).__name__,
                pooling.weight_dropout.p, pooling.text_norm is pooling.output_norm, training_batch["audio"].shape[1],
                int(training_batch["audio_length"].max()))

    run = ex.run("built_components", named_configs=["demo"], options={"--loglevel": "ERROR"},
                 config_updates={"audio_features": {"segment_length": 3, "hop_length": 1.5, "aggregate": aggregate},
                                 "tap_hyperparams": {"p_dropout_weights": 0.25, "shared_norm": False},
                                 "data_loader": {"n_workers": 0}, "directories": {"data_dir": str(data_dir)}})
    assert run.result == (3 * 32000, 48000, embeds_padding, pooling_class, 0.25, False, batch_seconds * 32000,
                          5 * 32000)


@pytest.mark.parametrize("projection, projection_parameters, groups", [
    ("none", 0, ["audio_encoder", "audio_project", "sentence_encoder"]),
    ("linear", 128 * 128 + 128, ["audio_encoder", "audio_project", "sentence_encoder", "sentence_project"])])
def test_text_projection_is_published_empty_or_salsa_linear(data_dir, projection, projection_parameters, groups):
    from experiments.ex_dcase24 import build_model, build_optimisation
    from experiments.retrieval_module import RetrievalModule

    @ex.command(unobserved=True)
    def built_projection():
        model = build_model()
        text = ["a dog barks", "rain on a tin roof"]
        unprojected = model.text_encoder(text)
        module = RetrievalModule(model, build_optimisation(), "pair")
        return (sum(p.numel() for p in model.text_projection.parameters()),
                [group["name"] for group in module.parameter_groups()],
                bool(model.encode_text(text).equal(unprojected)))

    run = ex.run("built_projection", named_configs=["demo"], options={"--loglevel": "ERROR"},
                 config_updates={"sentence_features": {"projection": projection},
                                 "directories": {"data_dir": str(data_dir)}})
    assert run.result == (projection_parameters, groups, projection == "none")


def test_published_own_caption_protocol_trains_and_tests_end_to_end(data_dir):
    run = run_demo(data_dir, audio_features__aggregate="TAP_own_caption", max_epochs=2, log_every_n_steps=1)
    assert set(run.result) == RESULT_KEYS and all(0 <= v <= 1 for v in run.result.values())
    metrics_csv = next((Path(run.info["run_folder"]) / "logs").glob("*/metrics.csv")).read_text()
    assert "lr-AdamW/tap" in metrics_csv and "val/mAP@10" in metrics_csv


@pytest.mark.parametrize("frozen, train_dropout", [(False, False), (False, True), (True, True)])
def test_modules_train_in_the_published_modes(data_dir, frozen, train_dropout, monkeypatch):
    # Lightning keeps each module's train/eval mode; from_pretrained hands RoBERTa over in eval mode, and the
    # published runs kept it so (text dropout off), with PaSST in train mode. Checked inside real training steps.
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    modes = []

    class RecordModes(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_index):
            modes.append(tuple(frozenset(m.training for m in part.modules())
                               for part in (module.model.audio_encoder, module.model.text_encoder,
                                            module.model.pooling)))

    real_fit = L.Trainer.fit

    def fit_recording(trainer, *args, **kwargs):
        trainer.callbacks.append(RecordModes())
        return real_fit(trainer, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", fit_recording)
    run_demo(data_dir, audio_features__model_config__frozen=frozen, sentence_features__frozen=frozen,
             sentence_features__train_dropout=train_dropout)
    assert modes and set(modes) == {(frozenset({not frozen}), frozenset({train_dropout and not frozen}),
                                     frozenset({True}))}


def test_print_config_shows_the_published_defaults():
    config = ex.run("print_config", options={"--loglevel": "ERROR"}).config
    audio, text = config["audio_features"], config["sentence_features"]
    assert (audio["model"], audio["segment_length"], audio["hop_length"], audio["aggregate"]) == ("passt", 10, 10, "mean")
    assert (audio["model_config"]["freqm"], audio["model_config"]["timem"], audio["model_config"]["s_patchout_t"],
            audio["model_config"]["s_patchout_f"]) == (0, 0, 15, 2)
    assert (text["punctuation"], text["train_dropout"], text["projection"]) == ("delete", False, "none")
    assert (config["freeze_tau"], config["initial_tau"], config["precision"], config["test_weights"],
            config["positive_weighting"], config["tap_hyperparams"]["shared_norm"]) == (
        True, 0.05, "16-mixed", "last", "pair", True)


def test_data_is_checked_before_weights_and_weights_before_models(data_dir, monkeypatch):
    # Offline and without RoBERTa-large or PaSST in the caches: a missing dataset must be named first.
    import experiments.ex_dcase24 as experiment

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(data_dir / "empty_hf_home"))
    monkeypatch.setenv("TORCH_HOME", str(data_dir / "empty_torch_home"))
    monkeypatch.setattr(experiment, "build_model", lambda: pytest.fail("a model was built before the checks"))
    real = {"stand_in_models": False, "sentence_features__model": "roberta-large", "audio_features__model": "passt",
            "audio_features__model_config__pretrained": True}
    with pytest.raises(FileNotFoundError, match="Clotho folder not found: .*absent"):
        run_demo(data_dir, clotho_v2__folder_name="absent", **real)
    with pytest.raises(RuntimeError, match="offline .* not cached: audio weights passt: MISSING at .*passt-s-f128-p16-"
                                           "s16-ap.468.pt; text weights roberta-large: MISSING"):
        run_demo(data_dir, **real)
    assert not (data_dir / "runs").exists()


class FallingValidation(L.LightningModule):
    """Validation mAP@10 falls by 0.1 an epoch from 1.0."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_index):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_index):
        self.log("val/mAP@10", 1.0 - 0.1 * self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD([{"params": self.parameters(), "name": "all"}], lr=0.1)


class RisingValidation(FallingValidation):
    """Validation mAP@10 rises by 0.1 an epoch, so every epoch saves a new best and removes the one before; its
    training steps take 0.3 s each (an epoch outlasts two checkpoint writes of 0.2 s)."""

    def training_step(self, batch, batch_index):
        time.sleep(0.3)
        return super().training_step(batch, batch_index)

    def validation_step(self, batch, batch_index):
        self.log("val/mAP@10", 0.1 * self.current_epoch)


def fit_falling(folder: Path, max_epochs: int, resume: str | None = None, module=FallingValidation,
                **settings) -> tuple[str, str]:
    """The experiment's own trainer (build_trainer) on FallingValidation (or `module`): (last checkpoint, best
    checkpoint)."""
    from experiments.ex_dcase24 import build_trainer
    from experiments.checkpointing import last_checkpoint

    @ex.command(unobserved=True)
    def fit_falling_validation():
        trainer = build_trainer(folder)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
        trainer.fit(module(), loader, loader, ckpt_path=resume)
        return last_checkpoint(trainer), trainer.checkpoint_callback.best_model_path

    return ex.run("fit_falling_validation", named_configs=["demo"], options={"--loglevel": "ERROR"},
                  config_updates={"max_epochs": max_epochs, "log_every_n_steps": 1, **settings}).result


def test_last_checkpoint_holds_the_last_epoch_when_validation_got_worse(tmp_path):
    # Lightning 2.6's save_last copy is written only with a new best checkpoint: with validation falling after the
    # first epoch, its last.ckpt held epoch 0, and test_weights=last tested the best weights.
    last, best = fit_falling(tmp_path, max_epochs=3)
    assert Path(last).name == "last.ckpt" and Path(best).name == "best-epoch=00.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 2 and torch.load(best, weights_only=False)["epoch"] == 0
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["best-epoch=00.ckpt", "last.ckpt"]


def test_each_epoch_logs_the_time_its_checkpoints_took_written_straight_to_a_file(tmp_path, slow_saves):
    targets = slow_saves(0.5)
    fit_falling(tmp_path, max_epochs=2)
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as handle:
        seconds = {int(row["epoch"]): float(row["time/checkpoint_seconds"]) for row in csv.DictReader(handle)
                   if row["time/checkpoint_seconds"]}
    assert 1.0 <= seconds[0] < 1.5  # best-epoch=00.ckpt and last.ckpt
    assert 0.5 <= seconds[1] < 1.0  # validation fell: last.ckpt alone
    # pickled into a temporary sibling of each checkpoint, not into memory first (Lightning's own way)
    assert [Path(target).parent for target in targets] == [tmp_path / "checkpoints"] * 3
    assert all(Path(target).name.startswith((".best-epoch=00.ckpt.", ".last.ckpt.")) for target in targets)


def test_background_checkpoints_hold_the_weights_of_their_save_and_the_run_waits_only_for_the_copy(
        tmp_path, monkeypatch, slow_saves):
    from lightning.pytorch.strategies import Strategy

    real_strategy_save, saved = Strategy.save_checkpoint, {}

    def recording_save(strategy, checkpoint, filepath, storage_options=None):  # what the trainer hands over
        saved[Path(filepath).name] = {key: value.clone() for key, value in checkpoint["state_dict"].items()}
        real_strategy_save(strategy, checkpoint, filepath, storage_options)

    monkeypatch.setattr(Strategy, "save_checkpoint", recording_save)
    slow_saves(0.5)
    last, best = fit_falling(tmp_path, max_epochs=3, background_checkpoints=True)
    assert sorted(saved) == ["best-epoch=00.ckpt", "last.ckpt"] and Path(best).name == "best-epoch=00.ckpt"
    for path in (last, best):  # each file holds the weights of its save, although training went on meanwhile
        written = torch.load(path, weights_only=False)["state_dict"]
        assert all(torch.equal(written[key], value) for key, value in saved[Path(path).name].items())
    assert not torch.equal(torch.load(last, weights_only=False)["state_dict"]["layer.weight"],
                           torch.load(best, weights_only=False)["state_dict"]["layer.weight"])
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as handle:
        seconds = {int(row["epoch"]): float(row["time/checkpoint_seconds"]) for row in csv.DictReader(handle)
                   if row["time/checkpoint_seconds"]}
    assert seconds[0] < 0.4  # best and last, each written for 0.5 s: the run waited for neither
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["best-epoch=00.ckpt", "last.ckpt"]


def test_background_checkpoints_do_not_hold_epochs_that_replace_the_best(tmp_path, slow_saves):
    slow_saves(0.2)
    last, best = fit_falling(tmp_path, max_epochs=3, module=RisingValidation, background_checkpoints=True)
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as handle:
        seconds = [float(row["time/checkpoint_seconds"]) for row in csv.DictReader(handle)
                   if row["time/checkpoint_seconds"]]
    assert len(seconds) == 3 and max(seconds) < 0.15  # written in the foreground, each epoch: 0.4 s or more
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["best-epoch=02.ckpt", "last.ckpt"]
    assert torch.load(best, weights_only=False)["epoch"] == torch.load(last, weights_only=False)["epoch"] == 2


def test_a_checkpoint_write_that_fails_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from experiments.checkpointing import FileCheckpointIO

    path = tmp_path / "checkpoints" / "last.ckpt"
    FileCheckpointIO().save_checkpoint({"epoch": 0}, path)

    def disk_full(state, target, *args, **kwargs):
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        FileCheckpointIO().save_checkpoint({"epoch": 1}, path)
    assert torch.load(path)["epoch"] == 0 and os.listdir(path.parent) == ["last.ckpt"]


def test_a_run_resumed_into_a_new_folder_keeps_the_best_epoch_before_the_interruption(tmp_path):
    # Lightning forgets the best score when the checkpoint folder changes (every resumed run has a new run folder):
    # the first resumed epoch (0.8) became the best although epoch 0 (1.0) was better.
    first_last, first_best = fit_falling(tmp_path / "first", max_epochs=2)
    last, best = fit_falling(tmp_path / "resumed", max_epochs=4, resume=first_last)
    assert best == first_best and torch.load(last, weights_only=False)["epoch"] == 3
    assert sorted(path.name for path in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize("test_weights, other", [("last", "best"), ("best", "last")])
def test_the_selected_weights_are_tested_and_the_others_logged(data_dir, monkeypatch, test_weights, other):
    import experiments.ex_dcase24 as experiment

    calls = []
    real = experiment.evaluate_checkpoint

    def recording(trainer, module, loader, checkpoint, prefix):
        calls.append((Path(checkpoint).name, prefix))
        return real(trainer, module, loader, checkpoint, prefix)

    monkeypatch.setattr(experiment, "evaluate_checkpoint", recording)
    run = run_demo(data_dir, max_epochs=2, test_weights=test_weights)
    names = {"last": "last.ckpt", "best": Path(run.info["best_checkpoint"]).name}
    assert calls == [(names[test_weights], "test"), (names[other], f"test_{other}")]
    assert set(run.info[f"test_{other}"]) == set(run.result) == RESULT_KEYS
    metrics_csv = next((Path(run.info["run_folder"]) / "logs").glob("*/metrics.csv")).read_text()
    assert "test/mAP@10" in metrics_csv and f"test_{other}/mAP@10" in metrics_csv
