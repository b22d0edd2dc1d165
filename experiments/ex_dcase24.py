"""Stage-1 language-based audio retrieval on Clotho v2.1 (DCASE 2024 task 8 systems).

    python -m experiments.ex_dcase24 with demo                 # CPU demo on generated data
    python -m experiments.ex_dcase24 print_config with ...    # every setting, after overrides

All settings live in the config scopes below and reach the code only through the captured
builders, which hand plain arguments to the model, dataset and schedule constructors.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from sacred import Experiment

from data_loaders.audio_cache import stale_clips
from data_loaders.clotho_v2 import SPLITS, captions_csv, clotho_v2, load_multi_match, load_split, read_captions
from data_loaders.data_loader import data_loader, get_data_loader, get_dataset
from data_loaders.stored_embeddings import (EmbeddingSource, embed_training_set, load_stored_embeddings,
                                            write_embeddings)
from experiments.config_schema import (LEARNING_RATE_KEYS, TEST_WEIGHTS, setting_names, unknown_key_line,
                                       validate_config)
from experiments.retrieval_module import OptimisationSettings, RetrievalModule
from experiments.checkpointing import (BackgroundCheckpointIO, BestCheckpoint, CompileCacheCheckpoint, FileCheckpointIO,
                                       LastEpochCheckpoint, last_checkpoint)
from experiments.tracking import (PROFILE_TRACE, RUN_FOLDER_VARIABLE, ProfiledSteps, SacredMetrics, Throughput,
                                  TrainingProgressBar, fit_recording_interrupts, prepare_observer_options,
                                  route_mongo_failures)
from models.audio.passt import PasstEncoder, pretrained_weights_path
from models.pooling import POOLINGS, Pooling, make_pooling
from models.retrieval_model import RetrievalModel
from models.teacher import Teacher
from models.text.transformer import TextEncoder, resolve_text_model, text_model_available
from search.index import check_model, file_scores, model_fingerprint, read_index, top_files, update_index
from search.page import render_page, write_ranked_csv, write_similarity_csv
from utils.checkpoints import checkpoint_folder, load_model_weights, read_checkpoint, resolve_checkpoint
from utils.compile_cache import load_compile_cache
from utils.devices import bf16_problem
from utils.directories import directories, get_data_dir
from utils.distributed import is_rank_zero
from utils.figures import save_training_curves
from utils.files import write_text_atomically
from utils.metrics import split_chance
from utils.paths import create_unique_folder
from utils.schedule import save_schedule_plot

ex = Experiment("dcase24", ingredients=[directories, clotho_v2, data_loader])
DEMO_AUDIO_MODEL = "passt_small"
DEMO_TEXT_MODEL = "clotho_demo/roberta-tiny"
# arguments of commands (print_lr, cmd_test_on_clothov2, cmd_index, cmd_search), not settings
COMMAND_OPTIONS = ("output", "load_model", "index_audio", "index_file", "query", "queries_file", "top_k", "html_file",
                   "results_file", "similarity_file")
PROGRESS_BAR_REFRESH_STEPS = 10


@ex.option_hook
def observers_from_options(options: dict) -> None:
    prepare_observer_options(ex, options)


@ex.config_hook
def name_unknown_settings(config: dict, command_name: str, logger) -> dict:
    """Sacred refuses a top-level key that no function captures before the schema can name the setting it was meant
    to be; this says so first (nested unknown keys reach the schema, whose error names them)."""
    known = {name.split(".")[0] for name in setting_names()} | set(COMMAND_OPTIONS)
    for key in sorted(set(config) - known):
        logger.warning(unknown_key_line(key))
    return {}


@ex.config
def default_config():
    # Defaults are the behaviour of the code that published 30.16 / 31.91 / 32.45 (README, "Reproducing the
    # published numbers"); every other behaviour is a named value of a key.
    audio_features = {
        "model": "passt",  # passt: PaSST-S ap468, stride 16 | passt_s: ap486, stride 10 | passt_s_swa | passt_small
        "segment_length": 10,  # seconds of audio per encoder window
        "hop_length": 10,  # seconds between window starts; None: segment_length
        "aggregate": "mean",  # mean | TAP (each caption queries each clip) | TAP_own_caption (published protocol)
        "attention": "sdpa",  # sdpa: fused attention kernels | explicit: hear21passt's softmax(QK^T)V (same function)
        "embed_all_windows": False,  # True: padding windows go through PaSST too (masked afterwards): fixed shapes
        # (what CUDA graphs need), ~12% more audio FLOPs, yet 7% faster on an H200 (benchmarks/RESULTS.md)
        "augment_on_device": False,  # True: mel band edges, filter bank and patchout indices made on the GPU (the
        # same function; hear21passt makes them on the CPU and its copies wait for the GPU every step)
        "model_config": {
            "s_patchout_t": 15,  # structured patchout: time columns dropped in training
            "s_patchout_f": 2,  # structured patchout: frequency rows dropped in training
            "freqm": 0,  # SpecAugment frequency mask width (mel bins), training only; 0: off
            "timem": 0,  # SpecAugment time mask width (frames), training only; 0: off
            "pretrained": True,  # download and load the AudioSet weights
            "frozen": False,  # keep the audio encoder fixed
        },
    }
    sentence_features = {
        "model": "roberta-large",  # Hugging Face name, or a directory (absolute or below data_dir)
        "max_sentence_tokens": 32,
        "lowercase": True,
        "remove_punctuation": True,
        "punctuation": "delete",  # delete: "nature's" -> "natures" (published) | space: "nature s"
        "train_dropout": False,  # False: dropout off in training, as published | True: 0.2 hidden/attention dropout
        "projection": "none",  # none: unprojected, as at the commits that report 30.16 | linear: salsa's Linear
        "attention": "sdpa",  # sdpa: fused attention kernels | eager: transformers' explicit softmax (same function)
        "padding": "longest",  # longest: each batch to its longest caption | max_length: to max_sentence_tokens
        "frozen": False,
    }
    stand_in_models = False  # CPU stand-ins: passt -> passt_small, any text model -> the demo's tiny RoBERTa
    tap_hyperparams = {  # text-aware attention pooling (audio_features.aggregate=TAP or TAP_own_caption)
        "dim": 1024,  # width of the query/key/value projections
        "p_dropout_weights": 0.1,  # dropout on the attention weights (training only)
        "p_dropout_proj": 0.1,  # dropout on the pooled output (training only)
        "shared_norm": True,  # one LayerNorm for caption, windows and output (published) | False: three
        "init": "random",  # random: PyTorch's default initialisation (published) | mean: start as mean pooling
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
    freeze_tau = True  # published: tau stays at initial_tau | False: learned
    positive_weighting = "pair"  # pair: every positive pair weighs the same (published) | row: every caption/clip
    shared_representation_size = 1024
    normalize = True  # L2-normalise embeddings (cosine similarity)
    compile = False  # torch.compile both encoders (the first steps of each new shape pay for the compilation)
    compile_mode = "default"  # default | reduce-overhead (CUDA graphs: wants fixed shapes) | max-autotune
    compile_cache = None  # a file of compiled kernels: read before compiling if it exists, rewritten after the first
    # epoch and each test (a fresh machine then skips most of the compilation; README, "Training speed on one GPU")
    cuda_graph_step = False  # True: each training step's forward and backward replayed as one recorded CUDA graph
    # (one launch instead of the host's per-step work; fixed shapes, one GPU; README, "Training speed on one GPU")
    overlap_batch_copy = False  # True: each batch copied to the GPU on a stream of its own, while the step before runs
    precision = "16-mixed"  # Lightning precision: 16-mixed (fp16 AMP, published) | bf16-mixed | 32
    accumulate_grad_batches = 1
    gradient_clip_val = None
    max_audio_seconds = None  # random training crop before the audio encoder (memory); None: whole clip
    accelerator = "auto"
    devices = 1  # devices per node (processes on a CPU); data_loader.batch_size is per device
    num_nodes = 1  # machines, started by torchrun or srun (README, "Several GPUs and nodes")
    strategy = "auto"  # Lightning strategy: auto (DDP when devices > 1) | ddp | ddp_spawn | ...
    log_every_n_steps = 50
    profile_steps = 0  # >0: trace this many training steps of the last epoch (from its batch 10) with torch.profiler
    # into <run folder>/profile.trace.json.gz; time/profiled_step_ms logs their wall time (README, "Settings")
    monitor = "mAP@10"  # validation metric that picks the best checkpoint
    background_checkpoints = False  # True: training waits only for a copy of each checkpoint to host memory (kept
    # all run: the checkpoint's size, 5.3 GB for the baseline) and a thread writes it (README, "Settings")
    test_weights = "last"  # last: the weights after the last epoch (published) | best: the best-validation checkpoint
    require_gpu = False  # stop before training if no CUDA GPU is visible
    use_wandb = False  # also stream metrics and config to Weights & Biases (WANDB_MODE=offline: local only)
    wandb_project = "dcase24-retrieval"
    wandb_entity = None
    run_name = None  # W&B run name
    load_parameters = None  # weights that initialise this run: a checkpoint, a run folder or a run name (data_dir/runs)
    load_last = "best"  # of a run given by folder or name: best (validation) or last checkpoint
    resume_training = None  # checkpoint to continue (optimizer, schedule and epoch included)
    loss_weight = 1.0  # weight of the contrastive loss (stage 2, salsa: 0.0)
    distill_weight = 0.0  # weight of the distillation loss (stage 2, salsa: 1.0)
    distill_from = None  # stage 2: stage-1 runs (folders or names) whose stored embeddings teach, separated by ";"
    seed = 409194


@ex.named_config
def demo():
    # The whole pipeline on 2 CPU cores in minutes, on `python -m data_loaders.demo_data` output.
    audio_features = {"model": DEMO_AUDIO_MODEL, "segment_length": 5, "hop_length": 5,
                      "model_config": {"pretrained": False, "s_patchout_t": 0, "s_patchout_f": 0}}
    sentence_features = {"model": DEMO_TEXT_MODEL}  # hidden size 128 = shared_representation_size below
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
    lr_tap = 1e-4  # with tap_hyperparams.init=mean: TAP learns from random-init encoders (benchmarks/RESULTS.md)
    tap_hyperparams = {"init": "mean"}
    min_lr = 1e-5
    shared_representation_size = 128
    precision = "32"
    log_every_n_steps = 10
    max_audio_seconds = 5
    accelerator = "cpu"


@ex.named_config
def fast_gpu():
    # The published system with the speed levers that paid on an H200 (benchmarks/RESULTS.md: 87 -> 371 captions/s
    # end to end from the CUDA graphs; 356 on an H100): bf16 instead of fp16 autocast, hear21passt's augmentation
    # drawn on the device (other random numbers), fixed shapes (every window embedded, captions padded to
    # max_sentence_tokens) so that each encoder compiles once and CUDA graphs replay the step, evaluation in batches
    # of 64 clips. SDPA attention and fused AdamW are on by default. Checkpoints written in the background (the
    # same files; on CPU-2 a save held the run 0.4-0.8 s instead of 3-4 s, at 5.3 GB of host memory). On one GPU,
    # `graph_step` after it trains faster still (below).
    precision = "bf16-mixed"
    audio_features = {"embed_all_windows": True, "augment_on_device": True}
    sentence_features = {"padding": "max_length"}
    compile = True
    compile_mode = "reduce-overhead"
    data_loader = {"batch_size_eval": 64, "n_workers": 8}
    background_checkpoints = True
    require_gpu = True


@ex.named_config
def graph_step():
    # Added after fast_gpu on one GPU (`with fast_gpu graph_step`): the whole forward and backward pass replayed as
    # one CUDA graph, the encoders compiled in mode default inside it, and each batch copied to the GPU beside the
    # step before. H100, run 6: 416-421 captions/s end to end (fast_gpu alone: 356), replays drawing patchout afresh.
    # Not part of fast_gpu because it refuses DDP (and host-drawn SpecAugment, clipping, accumulation).
    cuda_graph_step = True
    compile_mode = "default"
    overlap_batch_copy = True


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


def runs_folder() -> Path:
    return get_data_dir() / "runs"


def uses_cuda(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


@ex.capture
def check_config(_config: dict) -> None:
    """The whole config against its schema (experiments/config_schema.py): every problem at once, before work."""
    validate_config({key: value for key, value in _config.items() if key not in COMMAND_OPTIONS})


@ex.capture
def check_hardware(precision, accelerator: str, devices, num_nodes: int, require_gpu: bool) -> None:
    """What training needs of the machine; separate from check_config so that print_lr runs anywhere."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"accelerator={accelerator!r} but no CUDA GPU is visible: run on a GPU machine, or set "
                           f"accelerator=auto (or cpu) with precision=32")
    if str(precision).startswith("16") and not uses_cuda(accelerator):
        raise ValueError(f"precision={precision!r} (fp16 AMP, the published setting) needs a CUDA GPU, and "
                         f"accelerator={accelerator!r} runs on the CPU here: set precision=32 or bf16-mixed")
    wanted = len(devices) if isinstance(devices, (list, tuple)) else devices
    if uses_cuda(accelerator) and isinstance(wanted, int) and wanted > torch.cuda.device_count():
        raise RuntimeError(f"devices={devices!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if num_nodes > 1 and not any(key in os.environ for key in ("WORLD_SIZE", "SLURM_NTASKS", "NODE_RANK")):
        raise RuntimeError(f"num_nodes={num_nodes} needs a launcher that starts the other machines: torchrun or "
                           f"srun (README, 'Several GPUs and nodes')")
    if uses_cuda(accelerator):  # Lightning's devices=N trains on cuda:0 to N-1; -1 and "auto" on every GPU
        indices = devices if isinstance(devices, (list, tuple)) else range(torch.cuda.device_count())[
            :wanted if isinstance(wanted, int) and wanted > 0 else None]
        for index in indices:
            problem = bf16_problem(precision, torch.cuda.get_device_name(index),
                                   torch.cuda.get_device_capability(index))
            if problem:
                raise RuntimeError(problem)
    if require_gpu and not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU is visible (require_gpu=True, set by fast_gpu, lean_single_gpu and make "
                           "train): run on a GPU machine, or add require_gpu=False to train on this machine anyway")


def window_and_hop_seconds(audio_features: dict) -> tuple[float, float]:
    hop_seconds = audio_features["hop_length"]
    return audio_features["segment_length"], audio_features["segment_length"] if hop_seconds is None else hop_seconds


@ex.capture
def build_audio_encoder(audio_features: dict, stand_in_models: bool) -> PasstEncoder:
    config = audio_features["model_config"]
    window_seconds, hop_seconds = window_and_hop_seconds(audio_features)
    return PasstEncoder(model=DEMO_AUDIO_MODEL if stand_in_models else audio_features["model"],
                        window_seconds=window_seconds, hop_seconds=hop_seconds,
                        pretrained=config["pretrained"] and not stand_in_models, s_patchout_t=config["s_patchout_t"],
                        s_patchout_f=config["s_patchout_f"], freqm=config["freqm"], timem=config["timem"],
                        frozen=config["frozen"],
                        embed_padding_windows=(POOLINGS[audio_features["aggregate"]].uses_padding_windows
                                               or audio_features["embed_all_windows"]),
                        attention=audio_features["attention"], augment_on_device=audio_features["augment_on_device"])


@ex.capture
def build_text_encoder(sentence_features: dict, stand_in_models: bool) -> TextEncoder:
    name = DEMO_TEXT_MODEL if stand_in_models else sentence_features["model"]
    return TextEncoder(resolve_text_model(name, get_data_dir()),
                       max_sentence_tokens=sentence_features["max_sentence_tokens"],
                       lowercase=sentence_features["lowercase"],
                       remove_punctuation=sentence_features["remove_punctuation"],
                       punctuation=sentence_features["punctuation"], frozen=sentence_features["frozen"],
                       train_dropout=sentence_features["train_dropout"], attention=sentence_features["attention"],
                       padding=sentence_features["padding"])


@ex.capture
def build_pooling(audio_features: dict, tap_hyperparams: dict, shared_representation_size: int,
                  normalize: bool) -> Pooling:
    return make_pooling(audio_features["aggregate"], shared_representation_size, normalize, dict(tap_hyperparams))


@ex.capture
def build_model(shared_representation_size: int, sentence_features: dict, initial_tau: float,
                freeze_tau: bool, compile: bool, compile_mode: str) -> RetrievalModel:
    model = RetrievalModel(build_audio_encoder(), build_text_encoder(), build_pooling(), shared_representation_size,
                           text_projection=sentence_features["projection"], initial_tau=initial_tau,
                           freeze_tau=freeze_tau)
    if compile:
        model.compile_encoders(mode=compile_mode)
    return model


@ex.capture
def build_optimisation(lr_audio_encoder: float, lr_audio_project: float, lr_sentence_encoder: float,
                       lr_sentence_project: float, lr_tap: float, min_lr: float, weight_decay: float,
                       warmup_length: float, rampdown_start: float, rampdown_stop: float,
                       rampdown_type: str) -> OptimisationSettings:
    return OptimisationSettings(lr_audio_encoder, lr_audio_project, lr_sentence_encoder, lr_sentence_project, lr_tap,
                                min_lr, weight_decay, warmup_length, rampdown_start, rampdown_stop, rampdown_type)


@ex.capture
def build_data_loaders(max_audio_seconds: float | None, data_loader: dict, audio_features: dict) -> dict:
    workers = data_loader["n_workers"]
    # Crops padded to the clip only for a pooling that attends over padding windows (the published own-caption TAP).
    uses_padding = POOLINGS[audio_features["aggregate"]].uses_padding_windows
    crop_windows = None if uses_padding else window_and_hop_seconds(audio_features)
    train = get_dataset("train", crop_seconds=max_audio_seconds, crop_windows=crop_windows, decode_workers=workers)
    return {"train": get_data_loader(train, train=True),
            **{split: get_data_loader(get_dataset(split, decode_workers=workers), train=False)
               for split in ("val", "test")}}


@ex.capture
def run_folder(_run) -> Path:
    """A fresh folder per run below data_dir/runs for checkpoints and local logs, made by rank 0 alone (the
    other ranks get its path; they write nothing, and Lightning broadcasts the checkpoint folder)."""
    if not is_rank_zero():
        return Path(os.environ.get(RUN_FOLDER_VARIABLE, runs_folder()))
    run_id = _run._id if _run._id is not None else "local"
    folder = create_unique_folder(runs_folder(), f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id}")
    os.environ[RUN_FOLDER_VARIABLE] = str(folder)
    return folder


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
                  accelerator: str, devices, num_nodes: int, strategy: str, monitor: str, log_every_n_steps: int,
                  profile_steps: int, background_checkpoints: bool, compile_cache: str | None, _run) -> L.Trainer:
    profiled = [ProfiledSteps(folder / PROFILE_TRACE, profile_steps)] if profile_steps else []
    compiled = [CompileCacheCheckpoint(compile_cache)] if compile_cache else []
    return L.Trainer(max_epochs=max_epochs, precision=precision, accumulate_grad_batches=accumulate_grad_batches,
                     gradient_clip_val=gradient_clip_val, accelerator=accelerator, devices=devices,
                     num_nodes=num_nodes, strategy=strategy, default_root_dir=folder, logger=build_loggers(folder),
                     # The bar reads its values from the device: refreshing every step would synchronise every step.
                     callbacks=[BestCheckpoint(folder / "checkpoints", f"val/{monitor}"),
                                LastEpochCheckpoint(folder / "checkpoints"),
                                LearningRateMonitor(logging_interval="step"), Throughput(),
                                SacredMetrics(_run), TrainingProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_STEPS),
                                *profiled, *compiled],
                     plugins=[BackgroundCheckpointIO() if background_checkpoints else FileCheckpointIO()],
                     log_every_n_steps=log_every_n_steps, num_sanity_val_steps=0)


@ex.capture
def plot_schedule(path: Path, audio_features: dict, min_lr: float, warmup_length: float, rampdown_start: float,
                  rampdown_stop: float, rampdown_type: str, max_epochs: int, _config: dict) -> Path:
    groups = [key for key in LEARNING_RATE_KEYS if key != "lr_tap" or audio_features["aggregate"] != "mean"]
    save_schedule_plot({key.removeprefix("lr_"): _config[key] for key in groups}, min_lr, warmup_length,
                       rampdown_start, rampdown_stop, rampdown_type, max_epochs, path)
    return path


def plot_training_curves(trainer: L.Trainer, path: Path) -> Path:
    csv_log = next(logger for logger in trainer.loggers if isinstance(logger, CSVLogger))
    return save_training_curves(Path(csv_log.log_dir) / "metrics.csv", path)


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


@ex.capture
def weights_report(audio_features: dict, sentence_features: dict, stand_in_models: bool) -> dict[str, tuple[str, bool]]:
    """Per kind of weights: a one-line state, and whether they are missing from their local cache."""
    audio_model = DEMO_AUDIO_MODEL if stand_in_models else audio_features["model"]
    weights = pretrained_weights_path(audio_model)
    if weights is None or not audio_features["model_config"]["pretrained"]:
        audio = (f"{audio_model}: random init, nothing to fetch", False)
    else:
        audio = (f"{audio_model}: {'found' if weights.is_file() else 'MISSING'} at {weights}", not weights.is_file())
    text_model = resolve_text_model(DEMO_TEXT_MODEL if stand_in_models else sentence_features["model"], get_data_dir())
    text_missing = not text_model_available(text_model)
    text = (f"{text_model}: {'MISSING (not in $HF_HOME)' if text_missing else 'available'}", text_missing)
    return {"audio weights": audio, "text weights": text}


def check_weights() -> None:
    """Offline (HF_HUB_OFFLINE=1), weights missing from their caches stop the run before any model is built."""
    missing = [f"{kind} {line}" for kind, (line, is_missing) in weights_report().items() if is_missing]
    if missing and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise RuntimeError(f"offline (HF_HUB_OFFLINE=1) and not cached: {'; '.join(missing)}. Fetch them once on a "
                           f"machine with internet (README, 'Pretrained weights')")
    for line in missing:
        print(f"{line}: downloading on first use")


@ex.capture
def build_test_trainer(precision, accelerator: str, devices, num_nodes: int, strategy: str) -> L.Trainer:
    return L.Trainer(precision=precision, accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                     strategy=strategy, logger=False, enable_checkpointing=False)


@ex.command
def cmd_test_on_clothov2(load_model: str, positive_weighting: str, max_audio_seconds: float | None,
                         data_loader: dict) -> dict[str, float]:
    """Test-split metrics of a checkpoint of this experiment: `cmd_test_on_clothov2 with load_model=CKPT`, on any
    number of devices (data_loader.batch_size_eval clips per step and device)."""
    check_config()
    check_hardware()
    multi_match = load_multi_match(load_split("test")[0])
    read_checkpoint(load_model, "load_model")
    check_weights()
    model = build_model()
    load_model_weights(model, load_model, key="load_model")
    loader = get_data_loader(get_dataset("test", decode_workers=data_loader["n_workers"]), train=False)
    module = RetrievalModule(model, build_optimisation(), positive_weighting, multi_match=multi_match)
    (tested,) = build_test_trainer().test(module, loader)
    metrics = {key.removeprefix("test/"): value for key, value in tested.items()}
    chance = split_chance([len(clip.captions) for clip in loader.dataset.clips])
    print(f"test split, {load_model}: {metrics_line(metrics, chance)}")
    return metrics


# Keys that pick how the same function is computed (tested equal): an index made with one value serves the other.
SAME_FUNCTION_KEYS = {"audio_features": ("attention", "embed_all_windows", "augment_on_device"),
                      "sentence_features": ("attention", "padding")}


@ex.capture
def search_settings(audio_features: dict, sentence_features: dict, tap_hyperparams: dict,
                    shared_representation_size: int, normalize: bool, stand_in_models: bool, clotho_v2: dict) -> dict:
    """What shapes the embeddings besides the weights: part of an index's model fingerprint."""
    audio_features, sentence_features = (
        {key: value for key, value in section.items() if key not in SAME_FUNCTION_KEYS[name]}
        for name, section in (("audio_features", audio_features), ("sentence_features", sentence_features)))
    return {"audio_features": audio_features, "sentence_features": sentence_features,
            "tap_hyperparams": tap_hyperparams, "shared_representation_size": shared_representation_size,
            "normalize": normalize,
            "stand_in_models": stand_in_models, "clip_seconds": clotho_v2["clip_seconds"],
            "sample_rate": clotho_v2["sample_rate"]}


@ex.capture
def search_model(checkpoint: str, audio_features: dict, accelerator: str) -> tuple[RetrievalModel, str]:
    """The model of `checkpoint` in eval mode on the run's device, and its fingerprint."""
    if audio_features["aggregate"] == "TAP_own_caption":
        raise ValueError("audio_features.aggregate='TAP_own_caption' pools each clip with its own caption, which a "
                         "search query is not: search with a mean or TAP model")
    read_checkpoint(checkpoint, "load_model")
    check_weights()
    model = build_model()
    load_model_weights(model, checkpoint, key="load_model")
    device = torch.device("cuda" if uses_cuda(accelerator) else "cpu")
    return model.eval().to(device), model_fingerprint(Path(checkpoint), search_settings())


@ex.command
def cmd_index(load_model: str, index_audio: str, index_file: str, clotho_v2: dict, data_loader: dict) -> dict:
    """Embed every audio file below `index_audio` (wav, flac, ogg, mp3; any rate, channels and length) into
    `index_file`; a second run embeds only new or changed files and drops deleted ones."""
    check_config()
    folder = Path(index_audio).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"index_audio={index_audio!r}: not a folder")
    model, fingerprint = search_model(load_model)
    report = update_index(model, folder, Path(index_file).expanduser(), fingerprint, str(Path(load_model).resolve()),
                          clotho_v2["sample_rate"], round(clotho_v2["clip_seconds"] * clotho_v2["sample_rate"]),
                          data_loader["batch_size_eval"])
    print(f"{index_file}: {len(report.embedded)} files embedded, {len(report.reused)} unchanged, "
          f"{len(report.dropped)} dropped")
    for name, reason in report.unreadable.items():
        print(f"not indexed: {name}: {reason}")
    return {"embedded": len(report.embedded), "unchanged": len(report.reused), "dropped": report.dropped,
            "unreadable": sorted(report.unreadable)}


@ex.command
def cmd_search(index_file: str, query: str | None = None, queries_file: str | None = None, top_k: int = 10,
               load_model: str | None = None, html_file: str | None = None, results_file: str | None = None,
               similarity_file: str | None = None) -> list[list[tuple[str, float]]]:
    """Rank the indexed files for `query` (or each line of `queries_file`): a table, and on request a ranked CSV,
    the full query x file similarity CSV (DCASE 2025 format) and a self-contained HTML page."""
    check_config()
    if (query is None) == (queries_file is None):
        raise ValueError("cmd_search needs query='...' or queries_file=PATH (one query per line), not both")
    if top_k < 1:
        raise ValueError(f"top_k={top_k}: expected >= 1")
    queries = [query] if query is not None else [line.strip() for line in
                                                 Path(queries_file).read_text(encoding="utf-8").splitlines()
                                                 if line.strip()]
    index = read_index(Path(index_file).expanduser())
    model, fingerprint = search_model(load_model or index["model"])
    check_model(index, fingerprint, Path(index_file))
    files, scores = file_scores(model, index, queries)
    ranked = top_files(files, scores, top_k)
    for text, results in zip(queries, ranked):
        print(f"\n{text}")
        for rank, (name, score) in enumerate(results, start=1):
            print(f"{rank:>4}  {score:7.4f}  {name}")
    folder = Path(index["folder"])
    if results_file:
        write_ranked_csv(Path(results_file), queries, ranked)
    if similarity_file:
        write_similarity_csv(Path(similarity_file), queries, files, scores)
    if html_file:
        write_text_atomically(html_file, render_page(folder, queries, ranked))
    return ranked


def metrics_line(metrics: dict[str, float], chance: dict[str, float]) -> str:
    """The metrics of both directions against chance, then DCASE 2025's multi-match ones."""
    others = [f"{name} {value:.4f}" for name, value in metrics.items() if name not in chance]
    return ", ".join([f"{metric} {metrics[metric]:.4f} (chance {chance[metric]:.4f})" for metric in chance] + others)


@ex.command
def cmd_check_setup(_run) -> dict:
    """What the current config needs and what is in place: data, caches, weights, GPU, observers."""
    report = {split: split_report(split) for split in SPLITS}
    report.update({kind: line for kind, (line, _) in weights_report().items()})
    report["GPU"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU only)"
    report["observers"] = ", ".join(type(observer).__name__ for observer in _run.observers) or "none"
    for key, line in report.items():
        print(f"{key:>14}: {line}")
    return report


@ex.command
def cmd_generate_embeddings(train_on: str, clotho_v2: dict, audio_features: dict, tap_hyperparams: dict,
                            shared_representation_size: int, normalize: bool, precision, accelerator: str,
                            data_loader: dict) -> dict:
    """Stage 2, step 1 (salsa): embed every training clip and caption with the weights of `load_parameters` (a run's
    `load_last` checkpoint) in eval mode, into two files beside that checkpoint."""
    check_config()
    check_hardware()
    checkpoint = initial_weights()
    if checkpoint is None:
        raise ValueError("cmd_generate_embeddings needs load_parameters=RUN (a run folder, a run name in "
                         f"{runs_folder()}, or a checkpoint)")
    clips, audio_folder = load_split("train")
    check_weights()
    model = build_model()
    load_model_weights(model, checkpoint)
    dataset = get_dataset("train", per_clip=True, decode_workers=data_loader["n_workers"])
    loader = get_data_loader(dataset, train=False)
    device = torch.device("cuda" if uses_cuda(accelerator) else "cpu")
    start = time.perf_counter()
    windows, masks, captions = embed_training_set(model.eval().to(device), loader,
                                                  [f"{audio_folder.name}/{clip.file_name}" for clip in clips],
                                                  device, precision)
    pooling = {"aggregate": audio_features["aggregate"], "shared_size": shared_representation_size,
               "normalize": normalize, "tap_hyperparams": dict(tap_hyperparams),
               "state_dict": {name: tensor.cpu() for name, tensor in model.pooling.state_dict().items()}}
    files = write_embeddings(EmbeddingSource(checkpoint, clotho_v2["folder_name"], train_on), windows, masks,
                             captions, pooling)
    summary = {"clips": len(windows), "captions": len(captions), "seconds": round(time.perf_counter() - start, 1),
               **{f"{kind}_file": str(path) for kind, path in zip(("audio", "caption"), files)},
               "megabytes": round(sum(path.stat().st_size for path in files) / 2**20, 1)}
    print(f"embedded {summary['clips']} clips and {summary['captions']} captions in {summary['seconds']} s: "
          f"{files[0]}, {files[1]} ({summary['megabytes']} MiB)")
    return summary


def evaluate_checkpoint(trainer: L.Trainer, module: RetrievalModule, loader, checkpoint: str,
                        prefix: str) -> dict[str, float]:
    """Test-split metrics of one checkpoint's weights, logged under `prefix`."""
    module.test_prefix = prefix
    (tested,) = trainer.test(module, loader, ckpt_path=checkpoint, weights_only=False)
    return {key.removeprefix(f"{prefix}/"): value for key, value in tested.items()}


@ex.capture
def initial_weights(load_parameters: str | None, load_last: str) -> Path | None:
    """The checkpoint `load_parameters` names (a file, or a run's best/last checkpoint), read once to check it."""
    if not load_parameters:
        return None
    checkpoint = resolve_checkpoint(load_parameters, load_last, runs_folder())
    read_checkpoint(checkpoint, "load_parameters")
    return checkpoint


@ex.capture
def build_teachers(distill_weight: float, distill_from: str | None, train_on: str, clotho_v2: dict) -> list[Teacher]:
    """Stage 2: the stage-1 runs of `distill_from`, each from its stored embeddings of this training set."""
    if distill_weight == 0:
        return []
    clips, audio_folder = load_split("train")
    keyed = [(f"{audio_folder.name}/{clip.file_name}", clip) for clip in clips]
    return [Teacher(load_stored_embeddings(name, checkpoint_folder(name, runs_folder()), train_on,
                                           clotho_v2["folder_name"], keyed))
            for name in (name.strip() for name in distill_from.split(";")) if name]


@ex.main
def train_and_evaluate(resume_training: str | None, seed: int, test_weights: str, positive_weighting: str,
                       loss_weight: float, distill_weight: float, compile_cache: str | None, cuda_graph_step: bool,
                       overlap_batch_copy: bool, _run) -> dict[str, float]:
    """Trains, then tests the weights `test_weights` selects (and logs the other's metrics as test_<other>/*).

    Checks run in the order that costs least when they fail: config, data files, checkpoints and stored
    embeddings, weights, then models.
    """
    check_config()
    check_hardware()
    for split in SPLITS:
        load_split(split)
    multi_match = load_multi_match(load_split("test")[0])
    checkpoint = initial_weights()
    if resume_training:
        read_checkpoint(resume_training, "resume_training", needs=("state_dict", "optimizer_states", "loops"))
    teachers = build_teachers()
    check_weights()
    if compile_cache:
        print(f"compile cache: {load_compile_cache(compile_cache)} artifacts read from {compile_cache}")
    L.seed_everything(seed, workers=True)
    model = build_model()
    if checkpoint:
        load_model_weights(model, checkpoint)
    loaders = build_data_loaders()
    module = RetrievalModule(model, build_optimisation(), positive_weighting, teachers, loss_weight, distill_weight,
                             multi_match, cuda_graph_step, overlap_batch_copy)
    folder = run_folder()
    route_mongo_failures(_run, folder)
    _run.info["run_folder"] = str(folder)
    if is_rank_zero():
        ex.add_artifact(str(plot_schedule(folder / "lr_schedule.png")))
    trainer = build_trainer(folder)
    fit_recording_interrupts(trainer, module, loaders["train"], loaders["val"], ckpt_path=resume_training)
    if is_rank_zero():
        ex.add_artifact(str(plot_training_curves(trainer, folder / "training_curves.png")))
    checkpoints = {"last": last_checkpoint(trainer), "best": trainer.checkpoint_callback.best_model_path}
    _run.info["best_checkpoint"] = checkpoints["best"]
    print(f"best checkpoint: {checkpoints['best']}")
    chance = split_chance([len(clip.captions) for clip in loaders["test"].dataset.clips])
    other = next(name for name in TEST_WEIGHTS if name != test_weights)
    results = {}
    for name, prefix in ((test_weights, "test"), (other, f"test_{other}")):
        results[name] = evaluate_checkpoint(trainer, module, loaders["test"], checkpoints[name], prefix)
        print(f"test split, {name} weights ({prefix}/*): {metrics_line(results[name], chance)}")
    _run.info[f"test_{other}"] = results[other]
    return results[test_weights]


if __name__ == "__main__":
    ex.run_commandline()
