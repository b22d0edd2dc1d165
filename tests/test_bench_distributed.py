"""The DDP benchmark reports each process count's last epoch as the run logged it."""
import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_last_epochs_figures_are_reported(data_dir: Path):
    """30 captions in batches of 2: 15 steps per epoch, the last 5 of them timed as steady."""
    results = data_dir / "results.jsonl"
    subprocess.run([sys.executable, "-m", "benchmarks.bench_distributed", "--data-dir", str(data_dir), "--devices",
                    "1", "--epochs", "2", "--json", str(results), "data_loader.batch_size=2"], cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["devices"] == 1 and row["epochs"] == 2 and row["settings"] == ["data_loader.batch_size=2"]
    with open(next(data_dir.glob("runs/*/logs/version_0/metrics.csv"))) as handle:
        logged = [line for line in csv.DictReader(handle) if line["epoch"] == "1"]
    for key in ("time/validation_seconds", "time/train_epoch_seconds", "time/train_samples_per_second"):
        assert [float(line[key]) for line in logged if line[key]] == [row[key]]
    assert row["time/train_epoch_seconds"] < row["run_seconds"]
