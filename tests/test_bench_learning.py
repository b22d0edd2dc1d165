import argparse

import pytest

from benchmarks.bench_learning import dataset_spec, paired_differences


def row(label: str, dataset: str, aggregate: str, seed: int, map_at_10: float) -> dict:
    return {"label": label, "dataset": dataset, "aggregate": aggregate, "seed": seed,
            "result": {"mAP@10": map_at_10}}


def test_variants_are_compared_with_the_reference_within_each_seed():
    rows = [row("published", "ordered:1", "mean", 1, 0.30), row("published", "ordered:1", "mean", 2, 0.40),
            row("published", "mixed:0", "mean", 1, 0.50),
            row("fast", "ordered:1", "mean", 2, 0.38), row("fast", "ordered:1", "mean", 1, 0.33),
            row("fast", "mixed:0", "mean", 1, 0.45),
            row("fast", "mixed:0", "TAP", 1, 0.20)]  # no reference run to pair with: left out
    differences = paired_differences(rows, "published")
    assert differences.keys() == {("fast", "ordered:1", "mean"), ("fast", "mixed:0", "mean")}
    assert differences[("fast", "ordered:1", "mean")] == pytest.approx([-0.02, 0.03])  # seed 2's, then seed 1's
    assert differences[("fast", "mixed:0", "mean")] == pytest.approx([-0.05])


def test_a_data_set_is_named_layout_and_seed_before_anything_runs():
    assert dataset_spec("ordered:1") == "ordered:1" and dataset_spec("mixed:0") == "mixed:0"
    for wrong in ("weird:1", "mixed", "ordered:x", "ordered:-1"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"the layout mixed or ordered .*got '{wrong}'"):
            dataset_spec(wrong)
