"""The loader benchmark times the real dataset and collate per worker count and, with --parts, per part."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_rates_per_cache_and_the_parts_of_a_batch(tmp_path: Path):
    results = tmp_path / "results.jsonl"
    subprocess.run([sys.executable, "-m", "benchmarks.bench_loader", "--clips", "4", "--workers", "0", "1",
                    "--batch-size", "4", "--batches", "3", "--parts", "--json", str(results)], cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    *rates, parts = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(row["cache"], row["workers"]) for row in rates] == [("float32", 0), ("float32", 1), ("float16", 0),
                                                                 ("float16", 1)]
    assert all(row["samples_per_second"] > 0 for row in rates)
    assert rates[2]["cache_mib_per_clip"] == pytest.approx(rates[0]["cache_mib_per_clip"] / 2, rel=0.05)
    assert parts["cache"] == "float32" and parts["batch"] == 4
    worker_ms = parts["read_ms"] + parts["collate_ms"] + parts["share_ms"]
    assert min(parts["read_ms"], parts["collate_ms"], parts["share_ms"], parts["receive_ms"]) > 0
    assert parts["worker_captions_per_second"] == pytest.approx(4000 / worker_ms)
    assert parts["receiving_captions_per_second"] == pytest.approx(4000 / parts["receive_ms"])
