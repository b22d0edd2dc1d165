"""Bad input fails before any work with a message naming the key, file or flag, and what is expected."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from experiments.config_schema import ConfigError
from tests.conftest import RESULT_KEYS
from tests.test_experiment import run_demo
from utils.devices import bf16_problem

CONFIG_CASES = [
    ({"audio_features__model": "cnn14"}, ConfigError, "audio_features.model='cnn14': expected one of 'passt', "
                                                      "'passt_s', 'passt_s_swa' or 'passt_small'"),
    ({"sentence_features__model": "gpt-9"}, ConfigError, "sentence_features.model='gpt-9' is unknown: choose one of"),
    ({"audio_features__segment_length": 40}, ConfigError, "segment_length=40 s is longer than the clip"),
    ({"stand_in_models": False, "audio_features__model": "passt", "audio_features__segment_length": 20},
     ConfigError, "segment_length=20 s is longer than audio_features.model='passt' accepts .10 s."),
    ({"audio_features__aggregate": "max"}, ConfigError,
     "audio_features.aggregate='max': expected one of 'mean', 'TAP' or 'TAP_own_caption'"),
    ({"audio_features__hop_length": 0}, ConfigError,
     r"audio_features.hop_length=0: expected > 0 \(or None: the same as segment_length\)"),
    ({"audio_features__model_config__freqm": -8}, ConfigError, "audio_features.model_config.freqm=-8: expected >= 0"),
    ({"audio_features__model_config__pretrained": "yes"}, ConfigError,
     "audio_features.model_config.pretrained='yes': expected a valid boolean"),
    ({"sentence_features__punctuation": "drop"}, ConfigError,
     "sentence_features.punctuation='drop': expected one of 'delete' or 'space'"),
    ({"sentence_features__projection": "mlp"}, ConfigError, "sentence_features.projection='mlp': expected one of"),
    ({"sentence_features__max_sentence_tokens": 0}, ConfigError, "max_sentence_tokens=0: expected >= 1"),
    ({"test_weights": "first"}, ConfigError, "test_weights='first': expected one of 'last' or 'best'"),
    ({"positive_weighting": "mean"}, ConfigError, "positive_weighting='mean': expected one of 'pair' or 'row'"),
    ({"lr_audio_encoder": 0}, ConfigError, "lr_audio_encoder=0: expected > 0"),
    ({"min_lr": 1.0}, ConfigError, "min_lr=1 is not below lr_audio_encoder=0.001"),
    ({"data_loader__batch_size": 0}, ConfigError, "data_loader.batch_size=0: expected >= 1"),
    ({"data_loader__batch_size": 2.5}, ConfigError, "data_loader.batch_size=2.5: expected a valid integer"),
    ({"data_loader__n_workers": -1}, ConfigError, "data_loader.n_workers=-1: expected >= 0"),
    ({"max_epochs": "abc"}, ConfigError, "max_epochs='abc': expected a valid integer"),
    ({"max_epochs": True}, ConfigError, "max_epochs=True: expected a valid integer"),
    ({"rampdown_start": 5, "rampdown_stop": 3}, ConfigError, "rampdown_stop=3 comes before rampdown_start=5"),
    ({"rampdown_type": "exp"}, ConfigError, "rampdown_type='exp': expected one of 'cosine', 'linear' or 'step'"),
    ({"train_on": "audiocaps"}, ConfigError, "train_on='audiocaps': expected one of 'clothov2'"),
    ({"tap_hyperparams__dim": 0}, ConfigError, "tap_hyperparams.dim=0: expected >= 1"),
    ({"tap_hyperparams__p_dropout_weights": 1.0}, ConfigError, "tap_hyperparams.p_dropout_weights=1.0: expected < 1"),
    ({"tap_hyperparams__init": "zeros"}, ConfigError, "tap_hyperparams.init='zeros': expected one of 'random'"),
    ({"monitor": "accuracy"}, ConfigError, "monitor='accuracy': expected one of 'R@1', 'R@5', 'R@10' or 'mAP@10'"),
    ({"clotho_v2__clip_seconds": -1}, ConfigError, "clotho_v2.clip_seconds=-1: expected > 0"),
    ({"max_audio_seconds": 0}, ConfigError, r"max_audio_seconds=0: expected > 0 \(or None: the whole clip\)"),
    ({"initial_tau": 0}, ConfigError, "initial_tau=0: expected > 0"),
    ({"devices": 0}, ConfigError, "devices=0: expected a number of devices >= 1"),
    ({"strategy": "horovod"}, ConfigError, "strategy='horovod': expected one of 'auto' or 'ddp'"),
    ({"num_nodes": 0}, ConfigError, "num_nodes=0: expected >= 1"),
    ({"num_nodes": 2}, RuntimeError, "num_nodes=2 needs a launcher that starts the other machines: torchrun or srun"),
    ({"precision": "bf17"}, ConfigError, "precision='bf17': expected one of '16-mixed', 'bf16-mixed'"),
    ({"precision": "bf16-true"}, ConfigError, "precision='bf16-true': keeps the weights themselves in half precision"),
    ({"compile_mode": "fast"}, ConfigError, "compile_mode='fast': expected one of 'default', 'reduce-overhead'"),
    ({"compile": True, "compile_mode": "max-autotune", "accumulate_grad_batches": 2}, ConfigError,
     "compile_mode='max-autotune' with accumulate_grad_batches=2: CUDA graphs .* overwrites"),
    ({"compile_cache": "/tmp/compile_cache.bin"}, ConfigError,
     "compile_cache='/tmp/compile_cache.bin' with compile=False: nothing would be compiled"),
    ({"compile": True, "compile_cache": "/"}, ConfigError, "compile_cache='/' is not a file"),
    ({"cuda_graph_step": True}, ConfigError, r"cuda_graph_step=True with audio_features.embed_all_windows=False: "
                                             r"needs True \(the number of real windows varies"),
    ({"cuda_graph_step": True, "audio_features__embed_all_windows": True, "audio_features__augment_on_device": True,
      "sentence_features__padding": "max_length", "compile": True, "compile_mode": "reduce-overhead",
      "precision": "16-mixed", "accumulate_grad_batches": 2, "audio_features__model_config__freqm": 8}, ConfigError,
     r"(?s)compile_mode='reduce-overhead': needs 'default'.*model_config.freqm=8: needs 0 \(torchaudio draws "
     r"SpecAugment's masks on the host\).*precision='16-mixed': needs bf16-mixed or 32.*accumulate_grad_batches=2: "
     r"needs 1"),
    ({"cuda_graph_step": True, "audio_features__embed_all_windows": True, "audio_features__model_config__timem": 4,
      "gradient_clip_val": 1.0, "devices": 2, "num_nodes": 2, "loss_weight": 0.5}, ConfigError,
     r"(?s)augment_on_device=False: needs True.*timem=4: needs 0.*padding='longest': needs 'max_length'.*"
     r"gradient_clip_val=1.0: needs None.*devices=2: needs 1.*num_nodes=2: needs 1.*loss_weight=0.5: needs 1.0"),
    ({"sentence_features__padding": "left"}, ConfigError,
     "sentence_features.padding='left': expected one of 'longest' or 'max_length'"),
    ({"load_parameters": "/missing.ckpt"}, ConfigError,
     "load_parameters='/missing.ckpt': not a checkpoint file, a run folder, or the name of a run in .*runs"),
    ({"load_last": "first"}, ConfigError, "load_last='first': expected one of 'best' or 'last'"),
    ({"distill_weight": 1.0}, ConfigError, "distill_weight=1 but distill_from names no stage-1 run"),
    ({"distill_from": "some-run"}, ConfigError, "distill_from='some-run' but distill_weight=0: the teachers would not"),
    ({"distill_from": "absent-run", "distill_weight": 1.0}, ConfigError,
     "distill_from='absent-run': not a checkpoint file, or a run folder"),
    ({"loss_weight": 0.0}, ConfigError, "loss_weight=0 and distill_weight=0: nothing to train"),
    ({"loss_weight": -1.0}, ConfigError, "loss_weight=-1.0: expected >= 0"),
    ({"resume_training": "/missing/last.ckpt"}, ConfigError,
     "resume_training='/missing/last.ckpt': checkpoint file not found"),
    ({"precision": "16-mixed"}, ValueError, "precision='16-mixed' .* needs a CUDA GPU"),
    ({"clotho_v2__folder_name": "absent"}, FileNotFoundError, "Clotho folder not found: .*absent"),
]
if not torch.cuda.is_available():
    CONFIG_CASES.append(({"accelerator": "gpu"}, RuntimeError, "accelerator='gpu' but no CUDA GPU is visible"))
CONFIG_CASES.append(({"accelerator": "gpu", "devices": torch.cuda.device_count() + 1, "precision": "32"},
                     RuntimeError, "CUDA GPU" if not torch.cuda.is_available() else "devices=.* but this machine has"))


@pytest.mark.parametrize("updates, error, message", CONFIG_CASES)
def test_bad_config_fails_before_training(data_dir, updates, error, message):
    with pytest.raises(error, match=message):
        run_demo(data_dir, **updates)
    assert not (data_dir / "runs").exists()  # nothing trained, no run folder


GPUS = {0: ("NVIDIA A100-SXM4-80GB", (8, 0)), 1: ("Tesla T4", (7, 5))}


def pretend_gpus(monkeypatch, *indices: int) -> None:
    """torch.cuda answering as a machine with the GPUs `GPUS[index]`, in that order (nothing runs on them)."""
    gpus = [GPUS[index] for index in indices]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: gpus[index][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: gpus[index][1])


@pytest.mark.parametrize("gpus, devices", [((1,), 1), ((0, 1), 2), ((0, 1), [1]), ((0, 1), -1)])
def test_bf16_on_a_gpu_without_bf16_tensor_cores_stops_before_work(data_dir, monkeypatch, gpus, devices):
    pretend_gpus(monkeypatch, *gpus)
    with pytest.raises(RuntimeError, match=r"precision='bf16-mixed' on Tesla T4 \(compute capability 7.5\): .*"
                                           r"from compute capability 8.0, Ampere, on.*set precision=16-mixed"):
        run_demo(data_dir, accelerator="gpu", precision="bf16-mixed", devices=devices)
    assert not (data_dir / "runs").exists()


def test_bf16_is_refused_only_on_gpus_before_ampere():
    assert bf16_problem("bf16-mixed", *GPUS[0]) is None
    assert bf16_problem("bf16-mixed", "NVIDIA H100 80GB HBM3", (9, 0)) is None
    assert bf16_problem("16-mixed", *GPUS[1]) is None and bf16_problem("32", *GPUS[1]) is None
    assert bf16_problem("bf16-true", *GPUS[1]).startswith("precision='bf16-true' on Tesla T4")


def test_bf16_on_the_gpus_in_use_passes_the_hardware_check(monkeypatch):
    from experiments.ex_dcase24 import check_hardware

    pretend_gpus(monkeypatch, 0, 1)  # the T4 is cuda:1, which devices=1 leaves out
    check_hardware(precision="bf16-mixed", accelerator="gpu", devices=1, num_nodes=1, require_gpu=True)
    check_hardware(precision="bf16-mixed", accelerator="gpu", devices=[0], num_nodes=1, require_gpu=True)


def test_every_config_problem_is_reported_at_once_one_line_each(data_dir):
    with pytest.raises(ConfigError) as raised:
        run_demo(data_dir, max_epochs="abc", monitor="accuracy", data_loader__batch_size=2.5,
                 audio_features__hop_length=0, tap_hyperparams__p_dropout_proj=-0.1)
    lines = str(raised.value).splitlines()
    assert lines[0] == "5 configuration problem(s):"
    assert sorted(line.strip().split("=")[0] for line in lines[1:]) == [
        "audio_features.hop_length", "data_loader.batch_size", "max_epochs", "monitor", "tap_hyperparams.p_dropout_proj"]


def test_cross_key_rules_are_reported_together(data_dir):
    with pytest.raises(ConfigError) as raised:
        run_demo(data_dir, min_lr=1.0, rampdown_start=20, audio_features__segment_length=35)
    message = str(raised.value)
    assert message.startswith("3 configuration problem(s):")
    assert "rampdown_stop=14" in message and "min_lr=1 " in message and "segment_length=35" in message


def test_schema_covers_every_key_of_the_config():
    # A key added to the config without a field in the schema is an error naming it, so no key goes unchecked.
    from experiments.config_schema import validate_config
    from experiments.ex_dcase24 import ex

    config = dict(ex.run("print_config", options={"--loglevel": "ERROR"}).config)
    config["directories"] = {"data_dir": "/tmp"}
    validate_config(config)
    with pytest.raises(ConfigError, match="new_setting: unknown key"):
        validate_config({**config, "new_setting": 1})
    with pytest.raises(ConfigError, match="clotho_v2.new_setting: unknown key"):
        validate_config({**config, "clotho_v2": {**config["clotho_v2"], "new_setting": 1}})


@pytest.mark.parametrize("key, likely", [("max_epoch", "max_epochs"), ("batch_size", "data_loader.batch_size"),
                                         ("clotho_v2.folder_nam", "clotho_v2.folder_name"),
                                         ("audio_features.model_config.freq_m", "audio_features.model_config.freqm")])
def test_an_unknown_key_names_the_setting_it_likely_means(key, likely):
    from experiments.config_schema import unknown_key_line

    assert unknown_key_line(key) == f"{key}: unknown key (not a setting of this experiment; did you mean {likely}?)"
    assert unknown_key_line("new_setting").endswith("; check the spelling)")


def test_a_misspelt_top_level_key_is_named_before_sacred_refuses_it(data_dir, caplog):
    # Sacred stops at a top-level key no function captures, before the schema's check; the hint comes first.
    from sacred.utils import ConfigAddedError

    from experiments.ex_dcase24 import ex

    updates = {"directories": {"data_dir": str(data_dir)}, "max_epoch": 3, "load_model": "x.ckpt"}
    with pytest.raises(ConfigAddedError, match="max_epoch"), caplog.at_level("WARNING"):
        ex.run(named_configs=["demo"], config_updates=updates)
    hints = [record.getMessage() for record in caplog.records if "unknown key" in record.getMessage()]
    assert hints == ["max_epoch: unknown key (not a setting of this experiment; did you mean max_epochs?)"]


@pytest.mark.parametrize("key", ["load_parameters", "resume_training"])
def test_a_file_that_is_not_a_checkpoint_is_named(data_dir, key):
    text = data_dir / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=f"{key}='{text}' is not a PyTorch checkpoint"):
        run_demo(data_dir, **{key: str(text)})
    weights_only = data_dir / "weights.ckpt"
    torch.save({"weights": torch.zeros(2)}, weights_only)
    with pytest.raises(ValueError, match=f"{key}='{weights_only}' is not a Lightning checkpoint of this "
                                         r"experiment: no state_dict.* \(found: weights\)"):
        run_demo(data_dir, **{key: str(weights_only)})
    assert not (data_dir / "runs").exists()


def test_checkpoint_of_another_model_lists_the_weights_that_do_not_fit(data_dir):
    first = run_demo(data_dir)
    checkpoint = str(Path(first.info["run_folder"]) / "checkpoints" / "last.ckpt")
    second = run_demo(data_dir, load_parameters=checkpoint, max_epochs=1)  # same model: loads and trains
    assert set(second.result) == RESULT_KEYS
    runs_before = sorted((data_dir / "runs").iterdir())
    with pytest.raises(ValueError, match=r"does not fit this model .*weights 14 missing: pooling\.output_norm"):
        run_demo(data_dir, load_parameters=checkpoint, audio_features__aggregate="TAP")
    assert sorted((data_dir / "runs").iterdir()) == runs_before  # nothing trained


def test_loaded_weights_equal_the_checkpoint():
    from utils.checkpoints import load_model_weights

    source, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    path = Path(__import__("tempfile").mkdtemp()) / "lightning.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, path)
    load_model_weights(target, path)
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)
    torch.save({"state_dict": {"model.weight": source.weight[:1], "model.extra": source.bias}}, path)
    with pytest.raises(ValueError, match=r"1 missing: bias; 1 unexpected: extra; 1 of another shape: weight \(1, 3\) "
                                         r"vs \(2, 3\)"):
        load_model_weights(target, path)


GENERATOR_CASES = [
    (["--concurrency", "0"], "argument --concurrency: expected a value >= 1, got '0'"),
    (["--concurrency", "two"], "argument --concurrency: expected an integer >= 1, got 'two'"),
    (["--limit", "-3"], "argument --limit: expected a value >= 1, got '-3'"),
    (["--limit", "0"], "argument --limit: expected a value >= 1, got '0'"),
    (["--retries", "-1"], "argument --retries: expected a value >= 0, got '-1'"),
    (["--timeout", "0"], "argument --timeout: expected a value > 0, got '0'"),
    (["--temperature", "hot"], "argument --temperature: expected a number >= 0, got 'hot'"),
    (["--max-words", "0"], "argument --max-words: expected a value >= 1, got '0'"),
    (["--output", "/no/such/folder/out.csv"], "--output /no/such/folder/out.csv: folder /no/such/folder does not exist"),
]


@pytest.mark.parametrize("flags, message", GENERATOR_CASES)
def test_bad_caption_generator_flags_stop_before_any_request(data_dir, capsys, flags, message):
    from experiments.generate_captions_phi4 import main
    from tests.ollama_server import ScriptedOllama

    captions = data_dir / "clotho_demo" / "clotho_captions_development.csv"
    with ScriptedOllama() as server:
        with pytest.raises(SystemExit) as exited:
            main(["--captions", str(captions), "--host", server.host, *flags])
        assert exited.value.code == 2 and message in capsys.readouterr().err
        assert server.requests == []


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.unlink(), "captions CSV not found: .*clotho_captions_development.csv"),
    (lambda path: path.write_text("name,text\na.wav,hello\n"), "clotho_captions_development.csv: missing column"),
    (lambda path: path.write_bytes(b"file_name,caption_1\nj.wav,J\xfcrgen\n"), "clotho_captions_development.csv: not utf-8 text"),
])
def test_unreadable_captions_for_the_generator_are_one_line_before_any_request(data_dir, damage, message):
    from experiments.generate_captions_phi4 import main
    from tests.ollama_server import ScriptedOllama

    captions = data_dir / "clotho_demo" / "clotho_captions_development.csv"
    damage(captions)
    with ScriptedOllama() as server:
        with pytest.raises(SystemExit, match=f"error: .*{message}"):
            main(["--captions", str(captions), "--host", server.host])
        assert server.requests == []


def test_ctrl_c_marks_the_run_interrupted_and_resume_continues_the_schedule(data_dir):
    # A real subprocess gets SIGINT once the first epoch's checkpoint exists, then a second run resumes from it.
    # The seven remaining epochs take about 5 s on CPU-2: the run is stopped first, so Ctrl-C cannot come too late.
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.test_experiment import REPO
    from utils.schedule import learning_rate

    settings = ["max_epochs=8", "data_loader.batch_size=8", "data_loader.n_workers=0", "log_every_n_steps=1",
                "warmup_length=1", "rampdown_start=2", "rampdown_stop=8"]
    observer = data_dir / "sacred"
    process = subprocess.Popen([sys.executable, "-m", "experiments.ex_dcase24", "-F", str(observer), "with", "demo",
                                f"directories.data_dir={data_dir}", *settings], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               # a shell's background jobs inherit SIGINT ignored; Ctrl-C reaches a foreground run
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not list(data_dir.glob("runs/*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.05)
    # Stopped, the run cannot finish its remaining epochs before the SIGINT is pending; it arrives on SIGCONT.
    process.send_signal(signal.SIGSTOP)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGCONT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output[-3000:]
    (last,) = data_dir.glob("runs/*/checkpoints/last.ckpt")
    assert f"continue with resume_training={last}" in output
    assert json.loads((observer / "1" / "run.json").read_text())["status"] == "INTERRUPTED"

    saved = torch.load(last, map_location="cpu", weights_only=False)
    resumed = run_demo(data_dir, resume_training=str(last), **{key.replace(".", "__"): eval(value) for key, value in
                                                              (setting.split("=") for setting in settings)})
    assert set(resumed.result) == RESULT_KEYS
    rows = list(__import__("csv").DictReader(open(next((Path(resumed.info["run_folder"]) / "logs").glob(
        "*/metrics.csv")))))
    trained = [row for row in rows if row["train/loss"]]
    assert int(trained[0]["epoch"]) == saved["epoch"] + 1 and int(trained[-1]["epoch"]) == 7
    steps_per_epoch = saved["global_step"] / (saved["epoch"] + 1)
    first = next(row for row in rows if row["lr-AdamW/audio_encoder"])
    expected = learning_rate(int(first["step"]) / steps_per_epoch, 1e-3, 1e-5, 1, 2, 8, "cosine")
    assert int(first["step"]) == saved["global_step"]
    assert float(first["lr-AdamW/audio_encoder"]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("case, message", [
    ("manifest without the audio", "has no entry for clotho_audio_development.7z, clotho_audio_validation.7z"),
    ("ftp base url", "CLOTHO_BASE_URL='ftp://mirror/files': expected an http:// or https:// address"),
    ("data dir is a file", "exists and is not a folder (--data-dir / --folder-name)"),
])
def test_bad_downloader_input_stops_before_any_download(tmp_path, monkeypatch, capsys, case, message):
    from data_loaders.download_clotho import main
    from tests.test_download_clotho import Mirror

    server = Mirror({})
    manifest = tmp_path / "checksums.md5"
    names = [f"clotho_{kind}_{split}.csv" for kind in ("captions", "metadata")
             for split in ("development", "validation", "evaluation")]
    if case != "manifest without the audio":
        names += [f"clotho_audio_{split}.7z" for split in ("development", "validation", "evaluation")]
    manifest.write_text("".join(f"{'0' * 32}  {name}\n" for name in names))
    monkeypatch.setenv("CLOTHO_CHECKSUMS", str(manifest))
    monkeypatch.setenv("CLOTHO_BASE_URL", "ftp://mirror/files" if case == "ftp base url" else server.url)
    data_dir = tmp_path / "data"
    if case == "data dir is a file":
        data_dir.write_text("")
    with pytest.raises(SystemExit) as exited:
        main(["--data-dir", str(data_dir)])
    assert exited.value.code == 2 and message in capsys.readouterr().err
    assert server.requests == []
