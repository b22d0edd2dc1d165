"""Writing one training checkpoint of the baseline's size: Lightning's own checkpoint IO against ours.

    python -m benchmarks.bench_checkpoint --folder /tmp/ckpt --scale 0.5 --repeats 3 [--device cuda]

A run writes its weights and AdamW's two moments once or twice per epoch (`last.ckpt`, and `best-*.ckpt` when
validation improves): for PaSST ap468 and RoBERTa-large, 440.4 M parameters in 545 tensors, 5.3 GB. The checkpoint
here has that structure, scaled by `--scale`, with random values on `--device`. Lightning's `TorchCheckpointIO`
pickles the whole checkpoint into memory and then writes the bytes; `FileCheckpointIO` (experiments/checkpointing.py)
pickles straight into a temporary file renamed over the target; `BackgroundCheckpointIO`
(`background_checkpoints=True`) copies the tensors into host memory that it keeps from save to save and writes
from a thread. Each write is timed until the call returns (what a run waits for) and until `os.sync` has flushed
it; the background one also until its thread has written, and then a second save of the same state (an epoch
that improves validation saves best and last). Each repeat is a new training step; a sync and a pause before each
write.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from benchmarks.bench_stage1 import machine, report
from experiments.checkpointing import BackgroundCheckpointIO, FileCheckpointIO

BASELINE_PARAMETERS = 440.4e6  # PaSST ap468 (85.3 M) and RoBERTa-large (354.3 M) with the audio projection
BASELINE_TENSORS = 545


def baseline_sized_checkpoint(scale: float, device: str = "cpu") -> dict:
    """A Lightning checkpoint's shape: the weights, and AdamW's step and two moments per tensor."""
    size = round(BASELINE_PARAMETERS * scale / BASELINE_TENSORS)
    weights = {f"model.tensor_{index}": torch.randn(size, device=device) for index in range(BASELINE_TENSORS)}
    moments = {index: {"step": torch.tensor(100.0, device=device), "exp_avg": torch.randn(size, device=device),
                       "exp_avg_sq": torch.rand(size, device=device)} for index in range(BASELINE_TENSORS)}
    return {"epoch": 0, "global_step": 100, "state_dict": weights,
            "optimizer_states": [{"state": moments, "param_groups": [{"params": list(range(BASELINE_TENSORS))}]}]}


def timed_write(checkpoint_io, checkpoint: dict, path: Path, pause: float) -> dict[str, float]:
    os.sync()
    time.sleep(pause)
    start = time.perf_counter()
    checkpoint_io.save_checkpoint(checkpoint, path)
    times = {"seconds": time.perf_counter() - start}
    if isinstance(checkpoint_io, BackgroundCheckpointIO):
        checkpoint_io.wait()
        times["seconds_until_written"] = time.perf_counter() - start
    os.sync()
    times["seconds_until_flushed"] = time.perf_counter() - start
    if isinstance(checkpoint_io, BackgroundCheckpointIO):  # the same state again, as best and last are saved
        second = time.perf_counter()
        checkpoint_io.save_checkpoint(checkpoint, path.with_name("best.ckpt"))
        times["second_save_seconds"] = time.perf_counter() - second
        checkpoint_io.wait()
        path.with_name("best.ckpt").unlink()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", required=True, help="where to write (the disk a run's checkpoints go to)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the baseline's 5.3 GB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where the checkpoint's tensors are (a run's: its GPU)")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds of rest after the sync before each write")
    parser.add_argument("--json", help="also append each result as a JSON line to this file")
    args = parser.parse_args()
    checkpoint = baseline_sized_checkpoint(args.scale, args.device)
    gigabytes = sum(tensor.nbytes for tensor in checkpoint["state_dict"].values()) * 3 / 1e9
    path = Path(args.folder) / "last.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    background = BackgroundCheckpointIO()  # one for the whole run: its host memory is kept from save to save
    for repeat in range(args.repeats):
        checkpoint["global_step"] += 1  # a new state for the background mirror to copy
        for name, checkpoint_io in (("lightning", TorchCheckpointIO()), ("ours", FileCheckpointIO()),
                                    ("background", background)):
            times = timed_write(checkpoint_io, checkpoint, path, args.pause)
            report({"machine": machine(args.device), "device": args.device, "checkpoint_io": name,
                    "repeat": repeat, "gigabytes": gigabytes, **times,
                    "file_gigabytes": path.stat().st_size / 1e9}, args.json)
            path.unlink()


if __name__ == "__main__":
    main()
