"""Reading Lightning checkpoints given by users, with errors that name the setting, the file and what is wrong."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

SHOWN = 5  # names listed per kind of mismatch
LOAD_LAST = ("best", "last")  # which checkpoint of a run folder: best validation, or after the last epoch
LAST_CHECKPOINT = "last.ckpt"  # in a run's checkpoints/: the weights after the last finished epoch


def resolve_checkpoint(value: str, load_last: str, runs_folder: Path, key: str = "load_parameters") -> Path:
    """A checkpoint path as given, or the `load_last` checkpoint of a run (its folder, or its name below
    `runs_folder`), as salsa's commands name stage-1 runs."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    folder = path if path.is_dir() else runs_folder / value
    if not folder.is_dir():
        raise FileNotFoundError(f"{key}={value!r}: not a checkpoint file, a run folder, or the name of a run in "
                                f"{runs_folder}")
    checkpoints = folder / "checkpoints"
    found = sorted(checkpoints.glob("best-*.ckpt")) if load_last == "best" else \
        [checkpoints / LAST_CHECKPOINT] if (checkpoints / LAST_CHECKPOINT).is_file() else []
    if len(found) != 1:
        raise FileNotFoundError(f"{key}={value!r}: run folder {folder} holds {len(found) or 'no'} "
                                f"{'best-*.ckpt' if load_last == 'best' else LAST_CHECKPOINT} checkpoint(s) in "
                                f"checkpoints/ (load_last={load_last!r}: {' or '.join(LOAD_LAST)})")
    return found[0]


def checkpoint_folder(value: str, runs_folder: Path, key: str = "distill_from") -> Path:
    """The folder of a run's checkpoints (where its stage-1 embeddings are stored), from a checkpoint path, a run
    folder or a run name below `runs_folder`."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.parent
    folder = path if path.is_dir() else runs_folder / value
    if not (folder / "checkpoints").is_dir():
        raise FileNotFoundError(f"{key}={value!r}: not a checkpoint file, or a run folder (with checkpoints/) given "
                                f"by its path or its name in {runs_folder}")
    return folder / "checkpoints"


def read_checkpoint(path: str | Path, key: str, needs: tuple[str, ...] = ("state_dict",)) -> dict:
    """The checkpoint at `path` (memory-mapped, so a check costs little), or ValueError naming `key`."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{key}={str(path)!r}: checkpoint file not found") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as error:
        raise ValueError(f"{key}={str(path)!r} is not a PyTorch checkpoint ({type(error).__name__}: {error})") from None
    absent = [name for name in needs if not isinstance(checkpoint, dict) or name not in checkpoint]
    if absent:
        found = (", ".join(sorted(map(str, checkpoint))[:8]) if isinstance(checkpoint, dict)
                 else type(checkpoint).__name__)
        raise ValueError(f"{key}={str(path)!r} is not a Lightning checkpoint of this experiment: no "
                         f"{', '.join(absent)} (found: {found})")
    return checkpoint


def weight_mismatches(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `found` from loading into a model whose state dict is `expected`, one phrase per kind."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    reshaped = [f"{name} {tuple(found[name].shape)} vs {tuple(tensor.shape)}" for name, tensor in expected.items()
                if name in found and found[name].shape != tensor.shape]
    return [f"{len(names)} {kind}: {', '.join(names[:SHOWN])}{' ...' if len(names) > SHOWN else ''}"
            for kind, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
            if names]


def load_model_weights(model: torch.nn.Module, path: str | Path, key: str = "load_parameters",
                       prefix: str = "model.") -> None:
    """Initialise `model` from a training checkpoint of a (possibly differently configured) run of this experiment."""
    state = read_checkpoint(path, key)["state_dict"]
    weights = {name.removeprefix(prefix): tensor for name, tensor in state.items()}
    problems = weight_mismatches(model.state_dict(), weights)
    if problems:
        raise ValueError(f"{key}={str(path)!r} does not fit this model (was it trained with other audio_features / "
                         f"sentence_features / aggregate?): weights {'; '.join(problems)}")
    model.load_state_dict(weights)
