"""Stage-1 language-based audio retrieval on Clotho v2.1 (DCASE 2024 task 8 systems).

    python -m experiments.ex_dcase24 with demo                 # CPU demo on generated data
    python -m experiments.ex_dcase24 print_config with ...    # every setting, after overrides

All settings live in the config scopes below and reach the code only through the captured
builders, which hand plain arguments to the model, dataset and schedule constructors.
"""
from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from sacred import Experiment

from data_loaders.audio_cache import stale_clips
from data_loaders.clotho_v2 import SPLITS, captions_csv, clotho_v2, read_captions
from data_loaders.data_loader import data_loader, get_data_loader, get_dataset
from experiments.retrieval_module import OptimisationSettings, RetrievalModule
from experiments.tracking import SacredMetrics, prepare_observer_options, route_mongo_failures
from models.audio.passt import PasstEncoder, check_model_name, pretrained_weights_path
from models.pooling import AGGREGATIONS, MeanPooling, TextAwareAttentionPooling, check_tap_hyperparams
from models.retrieval_model import RetrievalModel
from models.text.transformer import TextEncoder, resolve_text_model, text_model_available
from utils.directories import directories, get_data_dir
from utils.metrics import chance_metrics
from utils.paths import create_unique_folder
from utils.schedule import save_schedule_plot, validate_schedule

ex = Experiment("dcase24", ingredients=[directories, clotho_v2, data_loader])
TRAIN_SETS = ("clothov2",)
DEMO_AUDIO_MODEL = "passt_small"
DEMO_TEXT_MODEL = "clotho_demo/roberta-tiny"
LEARNING_RATE_KEYS = ("lr_audio_encoder", "lr_audio_project", "lr_sentence_encoder", "lr_sentence_project", "lr_tap")


@ex.option_hook
def observers_from_options(options: dict) -> None:
    prepare_observer_options(ex, options)


@ex.config
def default_config():
    audio_features = {
        "model": "passt",  # passt: PaSST-S with AudioSet weights | passt_small: narrow, random init (CPU)
        "segment_length": 10,  # seconds of audio per encoder window
        "hop_length": None,  # seconds between window starts; None: segment_length (no overlap)
        "aggregate": "mean",  # how a caption sees a clip's windows
        "model_config": {
            "s_patchout_t": 15,  # structured patchout: time columns dropped in training
            "s_patchout_f": 2,  # structured patchout: frequency rows dropped in training
            "freqm": 48,  # SpecAugment frequency mask width (mel bins), training only
            "timem": 192,  # SpecAugment time mask width (frames), training only
            "pretrained": True,  # download and load the AudioSet weights
            "frozen": False,  # keep the audio encoder fixed
        },
    }
    sentence_features = {
        "model": "roberta-large",  # Hugging Face name, or a directory (absolute or below data_dir)
        "max_sentence_tokens": 32,
        "lowercase": True,
        "remove_punctuation": True,
        "frozen": False,
    }
    stand_in_models = False  # CPU stand-ins: passt -> passt_small, any text model -> the demo's tiny RoBERTa
    tap_hyperparams = {  # text-aware attention pooling (audio_features.aggregate=TAP)
        "dim": 1024,  # width of the query/key/value projections
        "p_dropout_weights": 0.1,  # dropout on the attention weights (training only)
        "p_dropout_proj": 0.1,  # dropout on the pooled output (training only)
    }
    train_on = "clothov2"
    max_epochs = 20
    warmup_length = 1  # epochs of linear warm-up
    rampdown_start = 1  # epoch at which the learning rate starts to fall
    rampdown_stop = 15  # epoch at which it reaches min_lr
    rampdown_type = "cosine"  # cosine | linear | step
    lr_audio_encoder = 2e-5
    lr_audio_project = 2e-5
    lr_sentence_encoder = 2e-5
    lr_sentence_project = 2e-5
    lr_tap = 2e-5  # TAP's projections and norms (aggregate=TAP)
    min_lr = 1e-7
    weight_decay = 0.0
    initial_tau = 0.05  # similarity temperature
    freeze_tau = False
    shared_representation_size = 1024
    normalize = True  # L2-normalise embeddings (cosine similarity)
    precision = "bf16-mixed"  # Lightning precision: bf16-mixed | 16-mixed | 32
    accumulate_grad_batches = 1
    gradient_clip_val = None
    max_audio_seconds = None  # random training crop before the audio encoder (memory); None: whole clip
    accelerator = "auto"
    devices = 1
    log_every_n_steps = 50
    monitor = "mAP@10"  # validation metric that picks the best checkpoint
    require_gpu = False  # stop before training if no CUDA GPU is visible
    use_wandb = False  # also stream metrics and config to Weights & Biases (WANDB_MODE=offline: local only)
    wandb_project = "dcase24-retrieval"
    wandb_entity = None
    run_name = None  # W&B run name
    load_parameters = None  # checkpoint whose model weights initialise this run
    resume_training = None  # checkpoint to continue (optimizer, schedule and epoch included)
    seed = 409194


@ex.named_config
def demo():
    # The whole pipeline on 2 CPU cores in minutes, on `python -m data_loaders.demo_data` output.
    audio_features = {"model": DEMO_AUDIO_MODEL, "segment_length": 5,
                      "model_config": {"pretrained": False, "s_patchout_t": 0, "s_patchout_f": 0,
                                       "freqm": 0, "timem": 0}}
    sentence_features = {"model": DEMO_TEXT_MODEL}
    stand_in_models = True  # so published commands with `demo` added run on a CPU
    clotho_v2 = {"folder_name": "clotho_demo"}
    data_loader = {"batch_size": 32, "batch_size_eval": 20, "n_workers": 1}
    max_epochs = 14
    warmup_length = 1
    rampdown_start = 2
    rampdown_stop = 14
    lr_audio_encoder = 1e-3
    lr_audio_project = 1e-3
    lr_sentence_encoder = 1e-3
    lr_sentence_project = 1e-3
    lr_tap = 1e-3
    min_lr = 1e-5
    shared_representation_size = 128
    precision = "32"
    log_every_n_steps = 10
    max_audio_seconds = 5
    accelerator = "cpu"


@ex.named_config
def lean_single_gpu():
    # The published memory-lean single-GPU recipe (`make train`): effective batch 36 = 6 x 6 accumulation,
    # 12 s training crops, bf16, 20 epochs with 1 warm-up epoch, peak learning rate 3e-6, clipping at 1.0.
    data_loader = {"batch_size": 6}
    accumulate_grad_batches = 6
    max_audio_seconds = 12
    precision = "bf16-mixed"
    max_epochs = 20
    warmup_length = 1
    rampdown_start = 1
    lr_audio_encoder = 3e-6
    lr_audio_project = 3e-6
    lr_sentence_encoder = 3e-6
    lr_sentence_project = 3e-6
    lr_tap = 3e-6
    gradient_clip_val = 1.0
    require_gpu = True


@ex.capture
def check_config(audio_features: dict, sentence_features: dict, tap_hyperparams: dict, train_on: str,
                 max_epochs: int, warmup_length: float, rampdown_start: float, rampdown_stop: float, rampdown_type: str,
                 min_lr: float, max_audio_seconds: float | None, clotho_v2: dict, data_loader: dict,
                 require_gpu: bool, _config: dict) -> None:
    """Every cheap check on the configuration, so bad input fails before models or data load."""
    check_model_name(audio_features["model"])
    resolve_text_model(sentence_features["model"], get_data_dir())
    if train_on not in TRAIN_SETS:
        raise ValueError(f"train_on={train_on!r} is not one of {', '.join(TRAIN_SETS)}")
    if audio_features["aggregate"] not in AGGREGATIONS:
        raise ValueError(f"audio_features.aggregate={audio_features['aggregate']!r} is not one of "
                         f"{', '.join(AGGREGATIONS)}")
    if audio_features["aggregate"] == "TAP":
        check_tap_hyperparams(tap_hyperparams["dim"], tap_hyperparams["p_dropout_weights"],
                              tap_hyperparams["p_dropout_proj"])
    for key in LEARNING_RATE_KEYS:
        if not _config[key] > 0:
            raise ValueError(f"{key}={_config[key]} must be positive")
    if min_lr < 0:
        raise ValueError(f"min_lr={min_lr} must be >= 0")
    for key in ("batch_size", "batch_size_eval"):
        if data_loader[key] < 1:
            raise ValueError(f"data_loader.{key}={data_loader[key]} must be >= 1")
    if audio_features["segment_length"] > clotho_v2["clip_seconds"]:
        raise ValueError(f"audio_features.segment_length={audio_features['segment_length']} s is longer than "
                         f"the clip (clotho_v2.clip_seconds={clotho_v2['clip_seconds']} s)")
    if max_audio_seconds is not None and not 0 < max_audio_seconds:
        raise ValueError(f"max_audio_seconds={max_audio_seconds} must be positive (or None)")
    validate_schedule(warmup_length, rampdown_start, rampdown_stop, rampdown_type, max_epochs)
    if require_gpu and not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU is visible (require_gpu=True, set by lean_single_gpu / make train): run on a "
                           "GPU machine, or add require_gpu=False to train on this machine anyway")


@ex.capture
def build_audio_encoder(audio_features: dict, stand_in_models: bool) -> PasstEncoder:
    config = audio_features["model_config"]
    return PasstEncoder(model=DEMO_AUDIO_MODEL if stand_in_models else audio_features["model"],
                        window_seconds=audio_features["segment_length"],
                        hop_seconds=audio_features["hop_length"] or audio_features["segment_length"],
                        pretrained=config["pretrained"] and not stand_in_models, s_patchout_t=config["s_patchout_t"],
                        s_patchout_f=config["s_patchout_f"], freqm=config["freqm"], timem=config["timem"],
                        frozen=config["frozen"])


@ex.capture
def build_text_encoder(sentence_features: dict, stand_in_models: bool) -> TextEncoder:
    name = DEMO_TEXT_MODEL if stand_in_models else sentence_features["model"]
    return TextEncoder(resolve_text_model(name, get_data_dir()),
                       max_sentence_tokens=sentence_features["max_sentence_tokens"],
                       lowercase=sentence_features["lowercase"],
                       remove_punctuation=sentence_features["remove_punctuation"],
                       frozen=sentence_features["frozen"])


@ex.capture
def build_pooling(audio_features: dict, tap_hyperparams: dict, shared_representation_size: int,
                  normalize: bool) -> torch.nn.Module:
    if audio_features["aggregate"] == "TAP":
        return TextAwareAttentionPooling(shared_representation_size, dim=tap_hyperparams["dim"],
                                         p_dropout_weights=tap_hyperparams["p_dropout_weights"],
                                         p_dropout_proj=tap_hyperparams["p_dropout_proj"], normalize=normalize)
    return MeanPooling(normalize=normalize)


@ex.capture
def build_model(shared_representation_size: int, normalize: bool, initial_tau: float,
                freeze_tau: bool) -> RetrievalModel:
    return RetrievalModel(build_audio_encoder(), build_text_encoder(), build_pooling(), shared_representation_size,
                          normalize=normalize, initial_tau=initial_tau, freeze_tau=freeze_tau)


@ex.capture
def build_optimisation(lr_audio_encoder: float, lr_audio_project: float, lr_sentence_encoder: float,
                       lr_sentence_project: float, lr_tap: float, min_lr: float, weight_decay: float,
                       warmup_length: float, rampdown_start: float, rampdown_stop: float,
                       rampdown_type: str) -> OptimisationSettings:
    return OptimisationSettings(lr_audio_encoder, lr_audio_project, lr_sentence_encoder, lr_sentence_project, lr_tap,
                                min_lr, weight_decay, warmup_length, rampdown_start, rampdown_stop, rampdown_type)


@ex.capture
def build_data_loaders(max_audio_seconds: float | None, data_loader: dict) -> dict:
    workers = data_loader["n_workers"]
    return {"train": get_data_loader(get_dataset("train", crop_seconds=max_audio_seconds, decode_workers=workers),
                                     train=True),
            **{split: get_data_loader(get_dataset(split, decode_workers=workers), train=False)
               for split in ("val", "test")}}


@ex.capture
def run_folder(_run) -> Path:
    """A fresh folder per run below data_dir/runs for checkpoints and local logs."""
    run_id = _run._id if _run._id is not None else "local"
    return create_unique_folder(get_data_dir() / "runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id}")


@ex.capture
def build_loggers(folder: Path, use_wandb: bool, wandb_project: str, wandb_entity: str | None,
                  run_name: str | None, _config: dict) -> list:
    loggers = [CSVLogger(folder, name="logs")]
    if use_wandb:
        from lightning.pytorch.loggers import WandbLogger
        wandb = WandbLogger(project=wandb_project, entity=wandb_entity, name=run_name or folder.name,
                            save_dir=str(folder))
        wandb.log_hyperparams(_config)
        loggers.append(wandb)
    return loggers


@ex.capture
def build_trainer(folder: Path, max_epochs: int, precision, accumulate_grad_batches: int, gradient_clip_val,
                  accelerator: str, devices, monitor: str, log_every_n_steps: int, _run) -> L.Trainer:
    checkpoint = ModelCheckpoint(dirpath=folder / "checkpoints", filename="best-{epoch:02d}",
                                 monitor=f"val/{monitor}", mode="max", save_last=True)
    return L.Trainer(max_epochs=max_epochs, precision=precision, accumulate_grad_batches=accumulate_grad_batches,
                     gradient_clip_val=gradient_clip_val, accelerator=accelerator, devices=devices,
                     default_root_dir=folder, logger=build_loggers(folder),
                     callbacks=[checkpoint, LearningRateMonitor(logging_interval="step"), SacredMetrics(_run)],
                     log_every_n_steps=log_every_n_steps,
                     num_sanity_val_steps=0)


@ex.capture
def plot_schedule(path: Path, audio_features: dict, min_lr: float, warmup_length: float, rampdown_start: float,
                  rampdown_stop: float, rampdown_type: str, max_epochs: int, _config: dict) -> Path:
    groups = [key for key in LEARNING_RATE_KEYS if key != "lr_tap" or audio_features["aggregate"] == "TAP"]
    save_schedule_plot({key.removeprefix("lr_"): _config[key] for key in groups}, min_lr, warmup_length,
                       rampdown_start, rampdown_stop, rampdown_type, max_epochs, path)
    return path


@ex.command
def print_lr(output: str = "lr_schedule.png") -> None:
    """Save the learning-rate schedule of the current config as a PNG: `print_lr with output=path.png ...`."""
    check_config()
    print(f"learning-rate schedule saved to {plot_schedule(Path(output)).resolve()}")


@ex.capture
def split_report(split: str, clotho_v2: dict) -> str:
    """One line on a split: clips, captions, missing audio, cache state."""
    folder = get_data_dir() / clotho_v2["folder_name"]
    clotho_split = SPLITS[split]
    try:
        clips = read_captions(captions_csv(folder, clotho_split))
    except (FileNotFoundError, ValueError) as error:
        return f"({clotho_split}) {error}"
    audio_folder = folder / clotho_split
    found = {clip.file_name: (audio_folder / clip.file_name).is_file() for clip in clips}
    present = [name for name, exists in found.items() if exists]
    missing = [name for name, exists in found.items() if not exists]
    cache_path = folder / "audio_cache" / f"{clotho_split}.h5"
    stale = stale_clips(cache_path, audio_folder, present, clotho_v2["sample_rate"])
    cache = "absent" if not cache_path.exists() else ("up to date" if not stale else f"{len(stale)} clips to decode")
    return (f"({clotho_split}) {len(clips)} clips, {sum(len(c.captions) for c in clips)} captions, "
            f"{len(missing)} audio files missing{' e.g. ' + repr(missing[0]) if missing else ''}; cache {cache}")


@ex.command
def cmd_check_setup(audio_features: dict, sentence_features: dict, stand_in_models: bool, _run) -> dict:
    """What the current config needs and what is in place: data, caches, weights, GPU, observers."""
    report = {split: split_report(split) for split in SPLITS}
    audio_model = DEMO_AUDIO_MODEL if stand_in_models else audio_features["model"]
    weights = pretrained_weights_path(audio_model)
    if weights is None or not audio_features["model_config"]["pretrained"]:
        report["audio weights"] = f"{audio_model}: random init, nothing to fetch"
    else:
        report["audio weights"] = f"{audio_model}: {'found' if weights.is_file() else 'MISSING'} at {weights}"
    text_model = resolve_text_model(DEMO_TEXT_MODEL if stand_in_models else sentence_features["model"], get_data_dir())
    report["text weights"] = f"{text_model}: {'available' if text_model_available(text_model) else 'MISSING (not in $HF_HOME)'}"
    report["GPU"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU only)"
    report["observers"] = ", ".join(type(observer).__name__ for observer in _run.observers) or "none"
    for key, line in report.items():
        print(f"{key:>14}: {line}")
    return report


@ex.main
def train_and_evaluate(load_parameters: str | None, resume_training: str | None, seed: int,
                       _run) -> dict[str, float]:
    """Trains, picks the best epoch on the validation split, returns its test-split metrics."""
    check_config()
    L.seed_everything(seed, workers=True)
    model = build_model()
    if load_parameters:
        state = torch.load(load_parameters, map_location="cpu", weights_only=False)["state_dict"]
        model.load_state_dict({key.removeprefix("model."): value for key, value in state.items()})
    loaders = build_data_loaders()
    module = RetrievalModule(model, build_optimisation())
    folder = run_folder()
    route_mongo_failures(_run, folder)
    _run.info["run_folder"] = str(folder)
    ex.add_artifact(str(plot_schedule(folder / "lr_schedule.png")))
    trainer = build_trainer(folder)
    trainer.fit(module, loaders["train"], loaders["val"], ckpt_path=resume_training)
    best = trainer.checkpoint_callback.best_model_path or None
    _run.info["best_checkpoint"] = best
    print(f"best checkpoint: {best}")
    (tested,) = trainer.test(module, loaders["test"], ckpt_path=best, weights_only=False)
    result = {key.removeprefix("test/"): value for key, value in tested.items()}
    chance = chance_metrics(len(loaders["test"].dataset))
    print("test split: " + ", ".join(f"{name} {result[name]:.4f} (chance {chance[name]:.4f})" for name in chance))
    return result


if __name__ == "__main__":
    ex.run_commandline()
