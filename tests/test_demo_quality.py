"""The CPU demo must learn: TAP on the full generated demo dataset beats chance by at least 3x.

The slowest test (about 2 minutes on 2 cores): it is the one check that the whole pipeline, from
synthetic audio to attention pooling, really learns rather than merely runs. A pipeline that does not
learn stays at chance (0.029). It trains 6 of the demo's 14 epochs (the schedule ramped down by epoch 6):
this run's last epoch tests 0.152 on CPU-2 (5.2x chance; data, text model and run are seeded, so it repeats on
the same software), and 14-epoch runs of the published TAP keys gave 0.255, 0.249, 0.314 for seeds 409194, 1, 2
(8.5x-10.7x chance; benchmarks/RESULTS.md). Before the TAP output-projection fix an ordered-events set stayed at
chance. 3x leaves room for the last-bit differences between CPUs.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

from data_loaders.demo_data import generate_demo_dataset
from utils.metrics import chance_metrics

REPO = Path(__file__).resolve().parents[1]


def test_tap_demo_beats_chance_threefold(tmp_path):
    generate_demo_dataset(tmp_path / "clotho_demo")
    completed = subprocess.run(
        [sys.executable, "-m", "experiments.ex_dcase24", "with", "demo", "audio_features.aggregate=TAP",
         "max_epochs=6", "rampdown_stop=6", f"directories.data_dir={tmp_path}"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=1200)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result_line = [line for line in completed.stderr.splitlines() if "Result: {" in line][-1]
    result = ast.literal_eval(result_line.split("Result: ", 1)[1])
    chance = chance_metrics(100)["mAP@10"]
    assert result["mAP@10"] >= 3 * chance, f"mAP@10 {result['mAP@10']:.3f} vs chance {chance:.3f}"
