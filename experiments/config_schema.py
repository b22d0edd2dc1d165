"""The stage-1 configuration as one typed schema, checked before anything is loaded.

Every key of the Sacred config must have a field here (unknown keys are errors), so a key cannot be
added without its type, range and allowed values. All problems are reported at once, one line each:
`dotted.key=value: what is allowed`.
"""
from __future__ import annotations

from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.audio.passt import ATTENTION_IMPLEMENTATIONS as AUDIO_ATTENTION, PASST_VARIANTS
from models.heads import TEXT_PROJECTIONS
from models.losses import POSITIVE_WEIGHTINGS
from models.pooling import AGGREGATIONS, TAP_INITS
from models.retrieval_model import COMPILE_MODES, CUDA_GRAPH_MODES
from models.text.transformer import (ATTENTION_IMPLEMENTATIONS as TEXT_ATTENTION, PADDINGS, PUNCTUATION_MODES,
                                     resolve_text_model)
from utils.checkpoints import LOAD_LAST, checkpoint_folder, resolve_checkpoint
from utils.metrics import METRIC_NAMES
from utils.schedule import RAMPDOWN_TYPES, validate_schedule

TRAIN_SETS = ("clothov2",)
TEST_WEIGHTS = ("last", "best")
PRECISIONS = ("16-mixed", "bf16-mixed", "32", "32-true", "64", "64-true", 16, 32, 64)
HALF_PRECISION_WEIGHTS = ("bf16-true", "16-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp")  # torch.distributed DDP, where the loss and evaluation gather across ranks
LEARNING_RATE_KEYS = ("lr_audio_encoder", "lr_audio_project", "lr_sentence_encoder", "lr_sentence_project", "lr_tap")

Count = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, lt=1)]


NONE_MEANS = {"audio_features.hop_length": "the same as segment_length", "max_audio_seconds": "the whole clip",
              "gradient_clip_val": "no clipping"}


class ConfigError(ValueError):
    """One or more configuration problems, one line each."""


class Section(BaseModel):
    # strict: no silent conversions ("3" is not 3, True is not 1); ints are accepted where floats are expected
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class PasstConfig(Section):
    s_patchout_t: NonNegativeInt
    s_patchout_f: NonNegativeInt
    freqm: NonNegativeInt
    timem: NonNegativeInt
    pretrained: bool
    frozen: bool


class AudioFeatures(Section):
    model: Literal[tuple(PASST_VARIANTS)]
    segment_length: Seconds
    hop_length: Optional[Seconds]
    aggregate: Literal[AGGREGATIONS]
    attention: Literal[AUDIO_ATTENTION]
    embed_all_windows: bool
    augment_on_device: bool
    passt: PasstConfig = Field(alias="model_config")


class SentenceFeatures(Section):
    model: str
    max_sentence_tokens: Count
    lowercase: bool
    remove_punctuation: bool
    punctuation: Literal[PUNCTUATION_MODES]
    train_dropout: bool
    projection: Literal[TEXT_PROJECTIONS]
    attention: Literal[TEXT_ATTENTION]
    padding: Literal[PADDINGS]
    frozen: bool


class TapHyperparams(Section):
    dim: Count
    p_dropout_weights: Probability
    p_dropout_proj: Probability
    shared_norm: bool
    init: Literal[TAP_INITS]


class ClothoV2(Section):
    folder_name: str
    add_phi4_captions: bool
    phi4_captions_file: str
    clip_seconds: Seconds
    sample_rate: Count
    multi_match_file: Optional[str]


class DataLoaderConfig(Section):
    batch_size: Count
    batch_size_eval: Count
    n_workers: NonNegativeInt


class Directories(Section):
    data_dir: str


class Stage1Config(Section):
    audio_features: AudioFeatures
    sentence_features: SentenceFeatures
    tap_hyperparams: TapHyperparams
    clotho_v2: ClothoV2
    data_loader: DataLoaderConfig
    directories: Directories
    stand_in_models: bool
    train_on: Literal[TRAIN_SETS]
    max_epochs: Count
    warmup_length: NonNegative
    rampdown_start: NonNegative
    rampdown_stop: NonNegative
    rampdown_type: Literal[RAMPDOWN_TYPES]
    lr_audio_encoder: Positive
    lr_audio_project: Positive
    lr_sentence_encoder: Positive
    lr_sentence_project: Positive
    lr_tap: Positive
    min_lr: NonNegative
    weight_decay: NonNegative
    initial_tau: Positive
    freeze_tau: bool
    positive_weighting: Literal[POSITIVE_WEIGHTINGS]
    shared_representation_size: Count
    normalize: bool
    compile: bool
    compile_mode: Literal[COMPILE_MODES]
    compile_cache: Optional[str]
    cuda_graph_step: bool
    overlap_batch_copy: bool
    precision: Any
    accumulate_grad_batches: Count
    gradient_clip_val: Optional[NonNegative]
    max_audio_seconds: Optional[Seconds]
    accelerator: Literal[ACCELERATORS]
    devices: Any
    num_nodes: Count
    strategy: Literal[STRATEGIES]
    log_every_n_steps: Count
    profile_steps: NonNegativeInt
    monitor: Literal[METRIC_NAMES]
    background_checkpoints: bool
    test_weights: Literal[TEST_WEIGHTS]
    require_gpu: bool
    use_wandb: bool
    wandb_project: str
    wandb_entity: Optional[str]
    run_name: Optional[str]
    load_parameters: Optional[str]
    load_last: Literal[LOAD_LAST]
    resume_training: Optional[str]
    loss_weight: NonNegative
    distill_weight: NonNegative
    distill_from: Optional[str]
    seed: int

    @field_validator("precision")
    @classmethod
    def known_precision(cls, value: Any) -> Any:
        if value in HALF_PRECISION_WEIGHTS:
            raise ValueError("keeps the weights themselves in half precision, where a fine-tuning step is lost: a "
                             "step of 2e-5 (the published peak learning rate) cannot change 87% of a pretrained "
                             "BERT's weights in bf16 (benchmarks/RESULTS.md); use 'bf16-mixed' (bf16 compute, "
                             "float32 weights)")
        if value not in PRECISIONS or isinstance(value, bool):
            raise ValueError(f"expected one of {', '.join(map(repr, PRECISIONS))}")
        return value

    @field_validator("devices")
    @classmethod
    def device_selection(cls, value: Any) -> Any:
        valid = (value == "auto" or (type(value) is int and (value >= 1 or value == -1))
                 or (isinstance(value, (list, tuple)) and value and all(type(i) is int and i >= 0 for i in value)))
        if not valid:
            raise ValueError("expected a number of devices >= 1 (-1: all), 'auto', or a list of device indices")
        return value


def setting_names(section: type[BaseModel] = Stage1Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config, as users write it (aliases such as `model_config`)."""
    names = []
    for name, field in section.model_fields.items():
        key = prefix + (field.alias or name)
        is_section = isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        names += setting_names(field.annotation, key + ".") if is_section else [key]
    return names


def unknown_key_line(key: str) -> str:
    """`key: unknown key (...)`, naming the setting it most likely means: a nested one written without its section
    (`batch_size`), or a close spelling."""
    names = setting_names()
    likely = [name for name in names if name.endswith("." + key)] or get_close_matches(key, names, n=1, cutoff=0.8)
    return f"{key}: unknown key (not a setting of this experiment; " + (
        f"did you mean {likely[0]}?)" if likely else "check the spelling)")


def problem_line(error: dict) -> str:
    key = ".".join(map(str, error["loc"]))  # pydantic reports aliases, so `model_config` stays as users write it
    if error["type"] == "extra_forbidden":
        return unknown_key_line(key)
    if error["type"] == "missing":
        return f"{key}: missing"
    if error["type"] == "literal_error":
        return f"{key}={error['input']!r}: expected one of {error['ctx']['expected']}"
    message = error["msg"].removeprefix("Value error, ")
    message = message.replace("Input should be", "expected").replace("less than", "<").replace(
        "greater than or equal to", ">=").replace("greater than", ">")
    none_means = f" (or None: {NONE_MEANS[key]})" if key in NONE_MEANS else ""
    return f"{key}={error['input']!r}: {message}{none_means}"


def cross_key_problems(config: Stage1Config) -> list[str]:
    """Rules across keys and against the file system, each an independent line."""
    problems = []
    audio, clotho = config.audio_features, config.clotho_v2
    try:
        validate_schedule(config.warmup_length, config.rampdown_start, config.rampdown_stop, config.rampdown_type,
                          config.max_epochs)
    except ValueError as error:
        problems.append(str(error))
    peaks = {key: getattr(config, key) for key in LEARNING_RATE_KEYS if key != "lr_tap" or audio.aggregate != "mean"}
    lowest = min(peaks, key=peaks.get)
    if config.min_lr >= peaks[lowest]:
        problems.append(f"min_lr={config.min_lr:g} is not below {lowest}={peaks[lowest]:g}: the schedule could not "
                        f"fall from its peak; set min_lr lower (published: 1e-07)")
    encoder_seconds = PASST_VARIANTS["passt_small" if config.stand_in_models else audio.model].max_window_seconds
    if audio.segment_length > clotho.clip_seconds:
        problems.append(f"audio_features.segment_length={audio.segment_length:g} s is longer than the clip "
                        f"(clotho_v2.clip_seconds={clotho.clip_seconds:g} s)")
    elif audio.segment_length > encoder_seconds:
        problems.append(f"audio_features.segment_length={audio.segment_length:g} s is longer than "
                        f"audio_features.model={audio.model!r} accepts ({encoder_seconds:g} s)")
    if config.compile and config.compile_mode in CUDA_GRAPH_MODES and config.accumulate_grad_batches > 1:
        problems.append(f"compile_mode={config.compile_mode!r} with accumulate_grad_batches="
                        f"{config.accumulate_grad_batches}: CUDA graphs hand back each step's gradients in memory "
                        f"that the next step's replay overwrites, so accumulated gradients come out wrong or the run "
                        f"stops (pytorch/pytorch#169545); use compile_mode=default, or accumulate_grad_batches=1")
    if config.cuda_graph_step:
        problems += cuda_graph_step_problems(config)
    if config.compile_cache is not None:
        cache = Path(config.compile_cache).expanduser()
        if not config.compile:
            problems.append(f"compile_cache={config.compile_cache!r} with compile=False: nothing would be compiled; "
                            f"set compile=True or drop compile_cache")
        elif cache.exists() and not cache.is_file():
            problems.append(f"compile_cache={config.compile_cache!r} is not a file (a folder?): name the file to "
                            f"read and write, e.g. compile_cache=~/compile_cache.bin")
    try:
        resolve_text_model(config.sentence_features.model, config.directories.data_dir)
    except ValueError as error:
        problems.append(str(error))
    runs = Path(config.directories.data_dir).expanduser() / "runs"
    if config.resume_training is not None and not Path(config.resume_training).expanduser().is_file():
        problems.append(f"resume_training={config.resume_training!r}: checkpoint file not found")
    if config.load_parameters is not None:
        try:
            resolve_checkpoint(config.load_parameters, config.load_last, runs)
        except FileNotFoundError as error:
            problems.append(str(error))
    problems += stage2_problems(config, runs)
    return problems


def cuda_graph_step_problems(config: Stage1Config) -> list[str]:
    """A recorded step replays the device work of its recording: nothing may come from the host or change shape,
    and nothing outside it may touch the gradients it writes."""
    audio, passt = config.audio_features, config.audio_features.passt
    host_masks = "torchaudio draws SpecAugment's masks on the host"
    single = config.devices == 1 or (isinstance(config.devices, (list, tuple)) and len(config.devices) == 1)
    needs = [  # (key, its value, whether it fits, what fits and why)
        ("compile_mode", config.compile_mode, not config.compile or config.compile_mode not in CUDA_GRAPH_MODES,
         "'default' (the encoders' own CUDA graphs cannot be recorded inside the step's)"),
        ("audio_features.embed_all_windows", audio.embed_all_windows, audio.embed_all_windows,
         "True (the number of real windows varies, and counting them reads the device)"),
        ("audio_features.augment_on_device", audio.augment_on_device, audio.augment_on_device,
         "True (hear21passt draws its augmentation on the host: a replay would repeat the recorded draws)"),
        ("audio_features.model_config.freqm", passt.freqm, not passt.freqm, f"0 ({host_masks})"),
        ("audio_features.model_config.timem", passt.timem, not passt.timem, f"0 ({host_masks})"),
        ("sentence_features.padding", config.sentence_features.padding,
         config.sentence_features.padding == "max_length", "'max_length' (fixed shapes)"),
        ("precision", config.precision, str(config.precision) not in ("16-mixed", "16"),
         "bf16-mixed or 32 (fp16 loss scaling reads the device in every step)"),
        ("accumulate_grad_batches", config.accumulate_grad_batches, config.accumulate_grad_batches == 1,
         "1 (each replay overwrites the gradients)"),
        ("gradient_clip_val", config.gradient_clip_val, not config.gradient_clip_val,
         "None (Lightning does not clip under manual optimisation)"),
        ("devices", config.devices, single, "1 (one process: DDP's gradient hooks are not recorded)"),
        ("num_nodes", config.num_nodes, config.num_nodes == 1, "1"),
        ("loss_weight", config.loss_weight, config.loss_weight == 1.0 and not config.distill_from,
         "1.0 without distill_from (stage 1 only)"),
    ]
    return [f"cuda_graph_step=True with {key}={value!r}: needs {expected}" for key, value, fits, expected in needs
            if not fits]


def stage2_problems(config: Stage1Config, runs: Path) -> list[str]:
    teachers = [name.strip() for name in (config.distill_from or "").split(";") if name.strip()]
    if config.loss_weight == 0 and config.distill_weight == 0:
        return ["loss_weight=0 and distill_weight=0: nothing to train; stage 1 uses loss_weight=1.0, stage 2 "
                "loss_weight=0.0 distill_weight=1.0"]
    if config.distill_weight > 0 and not teachers:
        return [f"distill_weight={config.distill_weight:g} but distill_from names no stage-1 run (runs separated by "
                f"';', e.g. distill_from=RUN_NAME)"]
    if teachers and config.distill_weight == 0:
        return [f"distill_from={config.distill_from!r} but distill_weight=0: the teachers would not be used; set "
                f"distill_weight=1.0 (salsa's stage 2) or drop distill_from"]
    problems = []
    for name in teachers:
        try:
            checkpoint_folder(name, runs)
        except FileNotFoundError as error:
            problems.append(str(error))
    if teachers and (config.devices not in (1, [0]) or config.num_nodes > 1):
        problems.append(f"distill_from with devices={config.devices!r} num_nodes={config.num_nodes}: stage 2 trains "
                        f"on one device for now (its targets are computed per local batch)")
    return problems


def validate_config(config: dict) -> Stage1Config:
    """The typed config, or ConfigError listing every problem (types and ranges first, then cross-key rules)."""
    try:
        checked = Stage1Config.model_validate(config)
    except ValidationError as error:
        lines = [problem_line(problem) for problem in error.errors()]
        raise ConfigError(f"{len(lines)} configuration problem(s):\n  " + "\n  ".join(lines)) from None
    lines = cross_key_problems(checked)
    if lines:
        raise ConfigError(f"{len(lines)} configuration problem(s):\n  " + "\n  ".join(lines))
    return checked
