"""Checkpoints of a training run: which ones it keeps (best, last), how long saving them holds the run, and how they
are written (atomically; with `background_checkpoints`, by a thread while training goes on); and the compiled
kernels a run leaves for the next machine (`compile_cache`)."""
from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from utils.checkpoints import LAST_CHECKPOINT
from utils.compile_cache import save_compile_cache
from utils.files import replaced_atomically

CHECKPOINT_SECONDS = "time/checkpoint_seconds"  # what an epoch's checkpoint saves held the run (`TimedCheckpoint`)
FRESH_COPY_BYTES = 16 * 2**20  # BackgroundCheckpointIO: changed tensors copied to new memory, not waited for


class FileCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing a local checkpoint straight into a temporary sibling that is then renamed
    over the target. As atomic as Lightning's own write, which first pickles the whole checkpoint into memory and
    then copies it out: about 3x slower for the baseline's 5.3 GB (19 s against 6 s on CPU-2, benchmarks/RESULTS.md),
    with its size held in memory twice. Paths of other file systems (s3://, ...) keep Lightning's way."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as temporary:
            torch.save(checkpoint, temporary)


def _map_tensors(value, function: Callable[[tuple, torch.Tensor], torch.Tensor], place: tuple = ()):
    """`value` rebuilt with each tensor replaced by `function(place, tensor)`, where `place` is its path through the
    nesting of dicts, lists and tuples (the containers copied, everything else shared)."""
    if isinstance(value, torch.Tensor):
        return function(place, value)
    if isinstance(value, dict):
        return type(value)((key, _map_tensors(item, function, (*place, key))) for key, item in value.items())
    if type(value) in (list, tuple):
        return type(value)(_map_tensors(item, function, (*place, index)) for index, item in enumerate(value))
    return value


class BackgroundCheckpointIO(FileCheckpointIO):
    """FileCheckpointIO's files, written by a background thread while training goes on (`background_checkpoints`).

    A run waits only while the checkpoint's tensors are copied into a host mirror that is kept from save to save:
    a memory copy instead of pickling and writing 5.3 GB. An epoch that improves validation saves one state twice
    (best and last); the second save finds the mirror current (the same global step, the same tensors unchanged
    since) and copies only what differs, the callbacks' scores. Before overwriting a mirror that writes in progress
    still read, a save waits for them; changed tensors of at most `FRESH_COPY_BYTES` in all get new memory instead.
    Loading a checkpoint and the end of training wait for the writes, removing one for its own; a write that failed
    raises there or at the next save, naming its file. Costs the checkpoint's size in host memory for the whole
    run. Tensors are found inside dicts, lists and tuples (what Lightning's checkpoints hold); any other object is
    pickled as it is when the write happens."""

    def __init__(self) -> None:
        super().__init__()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._writes: list[tuple[Future, str]] = []
        self._mirror: dict[tuple, tuple[torch.Tensor, int, torch.Tensor]] = {}  # place: (source, version, host)
        self._mirrored_step = None

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        self._raise_failed_writes()
        step, tensors = checkpoint.get("global_step"), {}
        _map_tensors(checkpoint, tensors.setdefault)
        changed = {place: tensor for place, tensor in tensors.items() if not self._mirrors(place, tensor, step)}
        if self._writes and sum(tensor.nbytes for tensor in changed.values()) > FRESH_COPY_BYTES:
            self.wait()
        self._copy_to_mirror(tensors, changed, step)
        host_checkpoint = _map_tensors(checkpoint, lambda place, _: self._mirror[place][2])
        self._writes.append((self._writer.submit(super().save_checkpoint, host_checkpoint, path, storage_options),
                             str(path)))

    def _mirrors(self, place: tuple, tensor: torch.Tensor, step) -> bool:
        if step is None or step != self._mirrored_step or place not in self._mirror:
            return False
        source, version, _ = self._mirror[place]  # held, so its memory cannot have gone to another tensor
        return (source.data_ptr(), source.shape, source.stride(), source.dtype, source.device, version) == (
            tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device, tensor._version)

    def _copy_to_mirror(self, tensors: dict[tuple, torch.Tensor], changed: dict[tuple, torch.Tensor], step) -> None:
        in_use = bool(self._writes)  # writes in progress read the mirror's memory
        mirror = {place: self._mirror[place] for place in tensors if place not in changed}
        for place, tensor in changed.items():
            previous = self._mirror.get(place)
            if not in_use and previous and (previous[2].shape, previous[2].dtype) == (tensor.shape, tensor.dtype):
                host = previous[2]
            else:  # pageable: pinned host memory comes in powers of two, up to twice the checkpoint for the run
                host = torch.empty(tensor.shape, dtype=tensor.dtype)
            host.copy_(tensor.detach())  # from a GPU: after the work queued before it, and done when it returns
            mirror[place] = (tensor, tensor._version, host)
        self._mirror, self._mirrored_step = mirror, step

    def _raise_failed_writes(self) -> None:
        failed = [(write, path) for write, path in self._writes if write.done() and write.exception() is not None]
        self._writes = [(write, path) for write, path in self._writes if not write.done()]
        if failed:
            write, path = failed[0]
            raise RuntimeError(f"writing checkpoint {path} in the background failed") from write.exception()

    def wait(self, path=None) -> None:
        """Returns when every checkpoint saved so far (to `path`, if given) is written; raises if a write failed."""
        concurrent.futures.wait([write for write, target in self._writes if path is None or target == str(path)])
        self._raise_failed_writes()

    def load_checkpoint(self, *args, **kwargs) -> dict:
        self.wait()
        return super().load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, path) -> None:
        """Lightning removes the previous best right after saving the new one: only a write to `path` is waited for."""
        self.wait(path)
        super().remove_checkpoint(path)

    def teardown(self) -> None:
        """The end of fitting (and of a test pass): the writes finish, the mirror's memory is released."""
        self.wait()
        self._mirror, self._mirrored_step = {}, None
        super().teardown()


class TimedCheckpoint(ModelCheckpoint):
    """Logs the seconds the run waits for its saves (state gathered from the device, pickled and written; with
    `BackgroundCheckpointIO`, copied to host memory) and removals of replaced checkpoints (with it, their writes
    finished first) as `time/checkpoint_seconds`, summed over the epoch: a run saves its weights and AdamW's moments
    (5.3 GB for the baseline) once or twice per epoch, time that the epoch's training and validation figures leave
    out. The experiment validates every epoch, so its checkpoints are saved at the end of the training epoch, where
    logging is allowed."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self._timed(trainer, super()._save_checkpoint, filepath)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self._timed(trainer, super()._remove_checkpoint, filepath)

    @staticmethod
    def _timed(trainer: L.Trainer, action, filepath: str) -> None:
        start = time.perf_counter()
        action(trainer, filepath)
        trainer.lightning_module.log(CHECKPOINT_SECONDS, time.perf_counter() - start, on_step=False, on_epoch=True,
                                     reduce_fx="sum")


class BestCheckpoint(TimedCheckpoint):
    """`best-<epoch>.ckpt`, the best validation `monitor` so far. A run resumed into a new run folder keeps competing
    with the best epoch before the interruption: Lightning forgets that score when the folder changes, so the first
    resumed epoch would become the best whatever its score (the earlier file stays where it is)."""

    def __init__(self, dirpath: Path, monitor: str):
        super().__init__(dirpath=dirpath, filename="best-{epoch:02d}", monitor=monitor, mode="max")

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        earlier, score = state_dict.get("best_model_path"), state_dict.get("best_model_score")
        if self.best_model_score is None and score is not None and earlier and Path(earlier).is_file():
            self.best_model_score = self.kth_value = score
            self.kth_best_model_path, self.best_k_models = earlier, {earlier: score}


class LastEpochCheckpoint(TimedCheckpoint):
    """`last.ckpt`: the weights, optimiser and schedule after every finished epoch (what `test_weights=last` tests
    and `resume_training` continues from). Lightning 2.6 writes `save_last`'s copy only when a best checkpoint is
    written in the same step, so beside a monitored checkpoint it held the last *improving* epoch's weights."""

    def __init__(self, dirpath: Path):
        super().__init__(dirpath=dirpath, filename=Path(LAST_CHECKPOINT).stem, monitor=None, save_top_k=1,
                         enable_version_counter=False)


def last_checkpoint(trainer: L.Trainer) -> str:
    """The path of the last finished epoch's checkpoint ('' before the first one)."""
    return next((callback.best_model_path for callback in trainer.checkpoint_callbacks
                 if isinstance(callback, LastEpochCheckpoint)), "")


class CompileCacheCheckpoint(L.Callback):
    """Writes `compile_cache` once the run's first epoch has compiled the training and validation graphs, so that a
    run stopped later (a time limit, a preempted node) leaves them for the next machine, and again after each test
    pass, whose graphs it adds."""

    def __init__(self, path: str):
        self.path = path
        self._written_after_training = False

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self._written_after_training:
            self._written_after_training = True
            self._write(trainer)

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:  # every rank compiled the same graphs
            message = f"compile cache: {save_compile_cache(self.path)} artifacts written to {self.path}"
            bar = trainer.progress_bar_callback  # its print keeps the bar's line whole
            (bar.print if bar is not None else print)(message)
