"""Writing one training checkpoint of the baseline's size: Lightning's own checkpoint IO against ours.

    python -m benchmarks.bench_checkpoint --folder /tmp/ckpt --scale 0.5 --repeats 3

A run writes its weights and AdamW's two moments once or twice per epoch (`last.ckpt`, and `best-*.ckpt` when
validation improves): for PaSST ap468 and RoBERTa-large, 440.4 M parameters in 545 tensors, 5.3 GB. The checkpoint
here has that structure, scaled by `--scale`, with random values on the CPU (what a GPU run adds, the copy of the
state to the host, is the same for both). Lightning's `TorchCheckpointIO` pickles the whole checkpoint into memory
and then writes the bytes; `FileCheckpointIO` (experiments/tracking.py) pickles straight into a temporary file
renamed over the target. Each write is timed until the call returns and until `os.sync` has flushed it; the two
alternate, with a sync and a pause before each.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from benchmarks.bench_stage1 import machine, report
from experiments.tracking import FileCheckpointIO

BASELINE_PARAMETERS = 440.4e6  # PaSST ap468 (85.3 M) and RoBERTa-large (354.3 M) with the audio projection
BASELINE_TENSORS = 545


def baseline_sized_checkpoint(scale: float) -> dict:
    """A Lightning checkpoint's shape: the weights, and AdamW's step and two moments per tensor."""
    size = round(BASELINE_PARAMETERS * scale / BASELINE_TENSORS)
    weights = {f"model.tensor_{index}": torch.randn(size) for index in range(BASELINE_TENSORS)}
    moments = {index: {"step": torch.tensor(100.0), "exp_avg": torch.randn(size), "exp_avg_sq": torch.rand(size)}
               for index in range(BASELINE_TENSORS)}
    return {"epoch": 0, "global_step": 100, "state_dict": weights,
            "optimizer_states": [{"state": moments, "param_groups": [{"params": list(range(BASELINE_TENSORS))}]}]}


def timed_write(checkpoint_io, checkpoint: dict, path: Path) -> tuple[float, float]:
    os.sync()
    time.sleep(2)
    start = time.perf_counter()
    checkpoint_io.save_checkpoint(checkpoint, path)
    returned = time.perf_counter() - start
    os.sync()
    return returned, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", required=True, help="where to write (the disk a run's checkpoints go to)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the baseline's 5.3 GB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also append each result as a JSON line to this file")
    args = parser.parse_args()
    checkpoint = baseline_sized_checkpoint(args.scale)
    gigabytes = sum(tensor.nbytes for tensor in checkpoint["state_dict"].values()) * 3 / 1e9
    path = Path(args.folder) / "last.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    for repeat in range(args.repeats):
        for name, checkpoint_io in (("lightning", TorchCheckpointIO()), ("ours", FileCheckpointIO())):
            returned, flushed = timed_write(checkpoint_io, checkpoint, path)
            report({"machine": machine("cpu"), "checkpoint_io": name, "repeat": repeat, "gigabytes": gigabytes,
                    "seconds": returned, "seconds_until_flushed": flushed,
                    "file_gigabytes": path.stat().st_size / 1e9}, args.json)
            path.unlink()


if __name__ == "__main__":
    main()
