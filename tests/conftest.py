"""Shared fixtures: a tiny generated dataset in the Clotho layout (built once per session), torch.save slowed down
to time checkpoint writes, and CUDA graph recordings stood in for on the CPU."""
from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from data_loaders.demo_data import generate_demo_dataset
from tests.graph_stand_in import record_on_the_cpu

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINY_SPLITS = {"development": 6, "validation": 3, "evaluation": 4}
# A run's result: the test split's metrics, text to audio and audio to text
RESULT_KEYS = {"mAP@10", "R@1", "R@5", "R@10", "a2t_mAP@10", "a2t_R@1", "a2t_R@5", "a2t_R@10"}


@pytest.fixture(scope="session")
def tiny_dataset_template(tmp_path_factory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("template") / "clotho_demo", TINY_SPLITS, seed=1)


@pytest.fixture
def data_dir(tmp_path, tiny_dataset_template) -> Path:
    """A fresh copy per test, so tests may break or extend it."""
    shutil.copytree(tiny_dataset_template, tmp_path / "clotho_demo")
    return tmp_path


@pytest.fixture
def slow_saves(monkeypatch):
    """`slow_saves(seconds)`: every torch.save sleeps that long first (or the next of several delays, one per save);
    returns the list of targets saved to, filled as the saves happen."""
    def slow_down(seconds: float | Iterable[float]) -> list:
        delays, real_save, targets = iter(seconds) if isinstance(seconds, Iterable) else None, torch.save, []

        def save(state, target, *args, **kwargs):
            targets.append(target)
            time.sleep(next(delays) if delays else seconds)
            real_save(state, target, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
        return targets

    return slow_down


@pytest.fixture
def cpu_graphs(monkeypatch) -> None:
    """Recorded steps record and replay on the CPU (`tests/graph_stand_in.py`)."""
    record_on_the_cpu(monkeypatch)
