"""Run history: Sacred observers (MongoDB, file storage) and Lightning loggers, wired for this experiment.

MongoDB comes from Sacred's `-m HOST:PORT:DB` or, once for all commands, from $DCASE24_MONGO (same
syntax). The server is pinged before the run starts; if it does not answer, the run stops with one line,
or, with $DCASE24_MONGO_FALLBACK=DIR, continues with a file observer in DIR and says so. A run whose
server goes away later still finishes: Sacred retries the final write and otherwise pickles the record
into the run folder's `mongo_failures/`, and every MongoDB run also keeps a file-observer copy.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from sacred.observers import FileStorageObserver, MongoObserver
from sacred.observers.mongo import parse_mongo_db_arg
from sacred.utils import SacredInterrupt
from torch.profiler import ProfilerActivity, profile

from experiments.checkpointing import CHECKPOINT_SECONDS, last_checkpoint
from utils.devices import start_host_copy
from utils.distributed import is_rank_zero
from utils.files import replaced_atomically
from utils.paths import default_data_dir

MONGO_OPTION = "--mongo_db"
FILE_OPTION = "--file_storage"
RUN_FOLDER_VARIABLE = "DCASE24_RUN_FOLDER"  # rank 0's run folder, inherited by the ranks Lightning starts
PROFILE_TRACE = "profile.trace.json.gz"  # ProfiledSteps' trace in the run folder (profile_steps > 0)
TRAIN_LOSS = "train/loss"  # the contrastive loss of each training batch, as the module logs it
WARMUP_BATCHES = 10  # training batches of an epoch before its steady rate is timed (and its steps profiled)


def mongo_reachable(url: str, timeout_ms: int = 2000) -> bool:
    import pymongo

    try:
        pymongo.MongoClient(url, serverSelectionTimeoutMS=timeout_ms).admin.command("ping")
        return True
    except pymongo.errors.PyMongoError:
        return False


class PatientMongoObserver(MongoObserver):
    """Sacred's MongoObserver with short server-selection time-outs, so an outage delays a run by seconds."""

    @classmethod
    def for_option(cls, value: str) -> "PatientMongoObserver":
        import pymongo

        settings = parse_mongo_db_arg(value)
        client = pymongo.MongoClient(settings.pop("url", "localhost:27017"), serverSelectionTimeoutMS=2000)
        return cls(client=client, **settings)


class BackupFileStorageObserver(FileStorageObserver):
    """The file-observer copy of MongoDB runs: numbers its own folders instead of taking the Mongo run id.

    Mongo ids restart at 1 in every database while the copies share one folder, so reusing them made a run
    against a fresh database crash at start on an existing `sacred_runs/1`. Folders are claimed with an atomic
    mkdir (Sacred's own numbering), so concurrent runs get distinct ones too; run.json keeps the config.
    """

    def _make_run_dir(self, _id) -> None:
        super()._make_run_dir(None)


def prepare_observer_options(experiment, options: dict) -> None:
    """Sacred option hook: default Mongo URL from the environment, ping it, fall back or stop. Ranks other than 0
    record nothing, so that a run on several processes is one Sacred run."""
    experiment.observers[:] = [o for o in experiment.observers
                               if not isinstance(o, (PatientMongoObserver, BackupFileStorageObserver))]
    if not is_rank_zero():
        options[MONGO_OPTION] = options[FILE_OPTION] = None
        return
    if not options.get(MONGO_OPTION) and os.environ.get("DCASE24_MONGO"):
        options[MONGO_OPTION] = os.environ["DCASE24_MONGO"]
    if not options.get(MONGO_OPTION):
        return
    value, options[MONGO_OPTION] = options[MONGO_OPTION], None  # the observer below replaces Sacred's own
    url = parse_mongo_db_arg(value).get("url", "localhost:27017")
    backup = Path(default_data_dir()).expanduser() / "sacred_runs"
    if not mongo_reachable(url):
        fallback = os.environ.get("DCASE24_MONGO_FALLBACK")
        if not fallback:
            sys.exit(f"error: MongoDB at {url} does not answer; start it (e.g. `mongod --dbpath DIR`), drop -m, or "
                     f"set DCASE24_MONGO_FALLBACK=DIR to record the run with a file observer instead")
        print(f"MongoDB at {url} does not answer: recording this run with a file observer in {fallback}",
              file=sys.stderr)
        options[FILE_OPTION] = fallback
        return
    observer = PatientMongoObserver.for_option(value)
    observer.failure_dir = str(Path(default_data_dir()).expanduser() / "runs" / "mongo_failures")
    experiment.observers.append(observer)
    if not options.get(FILE_OPTION):
        experiment.observers.append(BackupFileStorageObserver(str(backup)))
        print(f"recording in MongoDB at {url}, with a file-observer copy in {backup}", file=sys.stderr)


def route_mongo_failures(run, folder: Path) -> None:
    """A MongoObserver that cannot reach its server at the end pickles the run record into the run folder."""
    for observer in run.observers:
        if isinstance(observer, MongoObserver):
            observer.failure_dir = str(folder / "mongo_failures")


class SacredMetrics(L.Callback):
    """Per-epoch metrics into the Sacred run (`log_scalar`), under the Lightning log names; `train/loss` is the mean
    of the epoch's logged batch losses (not of the step outputs, which Lightning divides by the accumulated
    batches). An epoch's checkpoints are written after this callback's epoch end, so their time goes in when the
    next epoch starts, or training ends."""

    def __init__(self, run):
        self.run = run
        self._losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        loss = trainer.callback_metrics.get(TRAIN_LOSS)  # stays on the device: no wait per step
        if loss is not None:
            self._losses.append(loss)

    def on_train_epoch_end(self, trainer, module) -> None:
        epoch = trainer.current_epoch
        if self._losses:
            self.run.log_scalar(TRAIN_LOSS, torch.stack(self._losses).float().mean().item(), epoch)
            self._losses.clear()
        for group in trainer.optimizers[0].param_groups:
            self.run.log_scalar(f"lr-AdamW/{group['name']}", group["lr"], epoch)
        self._log_prefixed(trainer, ("time/", "memory/"))  # from Throughput, which runs before this callback

    def _log_prefixed(self, trainer, prefix: str | tuple[str, ...]) -> None:
        for name, value in trainer.callback_metrics.items():
            if name.startswith(prefix) and name != CHECKPOINT_SECONDS:
                self.run.log_scalar(name, float(value), trainer.current_epoch)

    def _log_checkpoint_seconds(self, trainer) -> None:
        """The last finished epoch's (`current_epoch` counts the finished ones here); none before its first."""
        seconds = trainer.callback_metrics.get(CHECKPOINT_SECONDS)
        if seconds is not None:
            self.run.log_scalar(CHECKPOINT_SECONDS, float(seconds), trainer.current_epoch - 1)

    def on_train_epoch_start(self, trainer, module) -> None:
        self._log_checkpoint_seconds(trainer)

    def on_train_end(self, trainer, module) -> None:
        self._log_checkpoint_seconds(trainer)

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self._log_prefixed(trainer, "val/")

    def on_test_end(self, trainer, module) -> None:
        self._log_prefixed(trainer, f"{module.test_prefix}/")


class LatestOnHost:
    """The newest value of a device scalar that has reached the host, read without waiting for the device: each read
    starts a copy of the value it is given (unless one is still on its way) and returns the newest copy that has
    arrived. From a GPU that is the value of an earlier read (None before the first arrives); on a CPU the copy is
    there at once."""

    def __init__(self, start_copy: Callable[[torch.Tensor], tuple[torch.Tensor, Callable[[], bool]]] = start_host_copy):
        self._start_copy = start_copy
        self._on_its_way: tuple[torch.Tensor, Callable[[], bool]] | None = None
        self.value: float | None = None

    def __call__(self, tensor: torch.Tensor) -> float | None:
        self._take_if_arrived()
        if self._on_its_way is None:
            self._on_its_way = self._start_copy(tensor)
            self._take_if_arrived()
        return self.value

    def _take_if_arrived(self) -> None:
        if self._on_its_way is not None and self._on_its_way[1]():
            self.value, self._on_its_way = self._on_its_way[0].item(), None


class TrainingProgressBar(TQDMProgressBar):
    """tqdm's bar with the training loss, which it reads without making the host wait for the device: on a GPU it
    shows the loss of its previous refresh. Lightning turns every value logged with `prog_bar=True` into a Python
    number after every batch, whatever the refresh rate, and a plain read at each refresh left the GPU idle while the
    host then fetched, copied and launched the next step (~15 ms every 10 batches in run 5's trace of the recorded
    step, benchmarks/RESULTS.md)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loss = LatestOnHost()

    def get_metrics(self, trainer, module) -> dict:
        loss = trainer.callback_metrics.get(TRAIN_LOSS)
        shown = None if loss is None else self._loss(loss)
        return {**super().get_metrics(trainer, module), **({} if shown is None else {TRAIN_LOSS: shown})}


def _synchronize(module: L.LightningModule) -> None:
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


class Throughput(L.Callback):
    """Per epoch: training captions per second (of all ranks) after `warmup_batches` (allocation, kernel selection
    and compilation happen there), the epoch's training seconds without its validation, and the validation seconds,
    logged as `time/*`; on a GPU also this rank's peak memory of the epoch, twice: what the allocator handed to tensors
    (`memory/peak_gpu_gib`) and what the process held from the GPU (`memory/peak_gpu_reserved_gib`). Replayed CUDA
    graphs run in memory their recording reserved and allocate nothing, so under `compile_mode=reduce-overhead` only
    the reserved figure counts their activations: size a GPU by it. Synchronises the device only at those few
    boundaries, never per step."""

    def __init__(self, warmup_batches: int = WARMUP_BATCHES):
        self.warmup_batches = warmup_batches
        self._epoch_start = self._steady_start = self._validation_start = 0.0
        self._steady_samples = 0
        self._validation_seconds = 0.0

    def on_train_epoch_start(self, trainer, module) -> None:
        _synchronize(module)
        if module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(module.device)
        self._epoch_start = time.perf_counter()
        self._steady_start, self._steady_samples, self._validation_seconds = 0.0, 0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:
        if batch_index == self.warmup_batches:
            _synchronize(module)
            self._steady_start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        if batch_index >= self.warmup_batches:  # every rank steps together: the run's rate counts them all
            self._steady_samples += len(batch["clip_index"]) * trainer.world_size

    def on_validation_epoch_start(self, trainer, module) -> None:
        _synchronize(module)
        self._validation_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, module) -> None:
        _synchronize(module)
        seconds = time.perf_counter() - self._validation_start
        self._validation_seconds += seconds
        if not trainer.sanity_checking:
            module.log("time/validation_seconds", seconds)

    def on_train_epoch_end(self, trainer, module) -> None:
        _synchronize(module)
        now = time.perf_counter()
        # Lightning validates inside the training epoch: its time is taken out of both figures.
        module.log("time/train_epoch_seconds", now - self._epoch_start - self._validation_seconds)
        if self._steady_samples:
            steady_seconds = now - self._steady_start - self._validation_seconds
            module.log("time/train_samples_per_second", self._steady_samples / steady_seconds)
        if module.device.type == "cuda":
            module.log("memory/peak_gpu_gib", torch.cuda.max_memory_allocated(module.device) / 2**30)
            module.log("memory/peak_gpu_reserved_gib", torch.cuda.max_memory_reserved(module.device) / 2**30)


class ProfiledSteps(L.Callback):
    """Traces `steps` training steps of the last epoch with torch.profiler, from its batch `first_batch` on (compiled,
    loader workers running), into `path` (a Chrome trace; rank 0), and logs their wall time per step under the
    profiler as `time/profiled_step_ms`. Unlike a model-step benchmark on ready batches, the trace shows whether a
    real run's GPU waits for the host, the loader or the copy of the batch."""

    def __init__(self, path: Path, steps: int, first_batch: int = WARMUP_BATCHES):
        self.path, self.steps, self.first_batch = Path(path), steps, first_batch
        self._profiler, self._start = None, 0.0

    def on_train_start(self, trainer, module) -> None:
        batches = trainer.num_training_batches
        if self.first_batch + self.steps > batches:
            remedy = (f"profile at most {batches - self.first_batch} steps" if batches > self.first_batch
                      else "train on more clips or in smaller batches")
            raise ValueError(f"profile_steps={self.steps}: the profile starts at training batch {self.first_batch} "
                             f"of the last epoch, which has {batches} batches; {remedy}")

    def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:
        last_epoch = trainer.current_epoch == trainer.max_epochs - 1
        if batch_index == self.first_batch and last_epoch and trainer.is_global_zero:
            _synchronize(module)
            cuda = [ProfilerActivity.CUDA] if module.device.type == "cuda" else []
            self._profiler = profile(activities=[ProfilerActivity.CPU, *cuda])
            self._profiler.start()
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        if self._profiler is None or batch_index != self.first_batch + self.steps - 1:
            return
        _synchronize(module)
        milliseconds = (time.perf_counter() - self._start) * 1000 / self.steps
        self._profiler.stop()
        with replaced_atomically(self.path) as temporary:
            self._profiler.export_chrome_trace(str(temporary))
        self._profiler = None
        module.log("time/profiled_step_ms", milliseconds, on_step=False, on_epoch=True, rank_zero_only=True)


class TrainingInterrupted(SacredInterrupt):
    """Ctrl-C during training: Sacred records the run as INTERRUPTED, and the message says how to continue."""
    STATUS = "INTERRUPTED"


def fit_recording_interrupts(trainer: L.Trainer, *fit_arguments, **fit_keywords) -> None:
    """`trainer.fit`, turning Lightning's exit after Ctrl-C into TrainingInterrupted naming the checkpoint to resume.

    Lightning catches KeyboardInterrupt inside fit, tears down and calls sys.exit(1), which Sacred would record
    as FAILED; `LastEpochCheckpoint` writes `last.ckpt` after every validation, so it holds the last finished epoch.
    """
    try:
        trainer.fit(*fit_arguments, **fit_keywords)
    except SystemExit:
        if not trainer.interrupted:
            raise
        last = last_checkpoint(trainer)
        if last and Path(last).is_file():
            raise TrainingInterrupted(f"interrupted in epoch {trainer.current_epoch}; {last} holds the weights, "
                                      f"optimiser and schedule after the last finished epoch: continue with "
                                      f"resume_training={last}") from None
        raise TrainingInterrupted(f"interrupted in epoch {trainer.current_epoch}, before any epoch finished: "
                                  f"no checkpoint was written, nothing to resume from") from None
