"""The `directories` ingredient: where data, caches and checkpoints live."""
from __future__ import annotations

from pathlib import Path

from sacred import Ingredient

from utils.paths import default_data_dir

directories = Ingredient("directories")


@directories.config
def directories_config():
    data_dir = default_data_dir()  # datasets, audio caches and checkpoints live below this folder


@directories.capture
def get_data_dir(data_dir: str) -> Path:
    return Path(data_dir).expanduser()
