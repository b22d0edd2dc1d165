"""One process vs two DDP processes on the CPU: training captions per second and full-split validation time.

    python -m benchmarks.bench_distributed --data-dir /tmp/ddp_bench

Runs the `demo` experiment (its generated data set, written if absent) for `--epochs` epochs with
`devices=1` and with `devices=2 strategy=ddp`, through the real command line, and reports what the run logged
(experiments/tracking.py's Throughput: the steady rate of all ranks together, and the validation seconds).
Each process gets `cpu_count / devices` threads, so both settings use the whole machine.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from benchmarks.bench_stage1 import machine, report, run_experiment
from data_loaders.demo_data import generate_demo_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="directories.data_dir (the demo data set is written there)")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--json", help="also append each result as a JSON line to this file")
    parser.add_argument("settings", nargs="*", help="further key=value settings of the experiment")
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    if not (data_dir / "clotho_demo").is_dir():
        generate_demo_dataset(data_dir / "clotho_demo")
    cpus = os.cpu_count() or 1
    for devices in args.devices:
        settings = ["demo", f"directories.data_dir={data_dir}", f"max_epochs={args.epochs}", f"devices={devices}",
                    "accelerator=cpu", "data_loader.n_workers=0", *(["strategy=ddp"] if devices > 1 else []),
                    *args.settings]
        os.environ["OMP_NUM_THREADS"] = str(max(1, cpus // devices))
        run_seconds, per_epoch, _ = run_experiment(data_dir, settings)
        report({"machine": machine("cpu"), "devices": devices, "threads_per_process": max(1, cpus // devices),
                "epochs": args.epochs, "settings": args.settings, "run_seconds": run_seconds,
                **per_epoch[args.epochs - 1]}, args.json)  # the last epoch's: workers running, nothing to start


if __name__ == "__main__":
    main()
