"""The checkpoint benchmark writes checkpoints of the baseline's structure, whole, all three ways."""
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_checkpoint import BASELINE_PARAMETERS, BASELINE_TENSORS, baseline_sized_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_the_checkpoint_has_the_baselines_tensors_and_adamw_moments_at_scale():
    checkpoint = baseline_sized_checkpoint(scale=1e-4)
    weights, moments = checkpoint["state_dict"], checkpoint["optimizer_states"][0]["state"]
    assert len(weights) == len(moments) == BASELINE_TENSORS
    assert abs(sum(tensor.numel() for tensor in weights.values()) - BASELINE_PARAMETERS * 1e-4) < BASELINE_TENSORS
    assert all(state["exp_avg"].shape == state["exp_avg_sq"].shape == weights[f"model.tensor_{index}"].shape
               for index, state in moments.items())


def test_all_three_ways_write_a_whole_checkpoint(tmp_path: Path):
    results = tmp_path / "results.jsonl"
    subprocess.run([sys.executable, "-m", "benchmarks.bench_checkpoint", "--folder", str(tmp_path / "disk"),
                    "--scale", "1e-4", "--repeats", "1", "--pause", "0", "--json", str(results)], cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [row["checkpoint_io"] for row in rows] == ["lightning", "ours", "background"]
    for row in rows:  # every tensor's bytes, and the pickle around them
        assert row["gigabytes"] < row["file_gigabytes"] and 0 < row["seconds"] <= row["seconds_until_flushed"]
    assert rows[2]["seconds"] <= rows[2]["seconds_until_written"] <= rows[2]["seconds_until_flushed"]
    assert list((tmp_path / "disk").iterdir()) == []  # each written file removed, no temporary left
