"""Shared fixtures: a tiny generated dataset in the Clotho layout (built once per session)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data_loaders.demo_data import generate_demo_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINY_SPLITS = {"development": 6, "validation": 3, "evaluation": 4}


@pytest.fixture(scope="session")
def tiny_dataset_template(tmp_path_factory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("template") / "clotho_demo", TINY_SPLITS, seed=1)


@pytest.fixture
def data_dir(tmp_path, tiny_dataset_template) -> Path:
    """A fresh copy per test, so tests may break or extend it."""
    shutil.copytree(tiny_dataset_template, tmp_path / "clotho_demo")
    return tmp_path
