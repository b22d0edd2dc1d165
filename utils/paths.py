"""Default locations, free of any configuration framework so scripts can share them."""
from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> str:
    """$DATA_DIR if set, else ~/data: datasets, audio caches and run folders all live below it."""
    return os.environ.get("DATA_DIR") or str(Path.home() / "data")


def create_unique_folder(parent: Path, name: str) -> Path:
    """Creates parent/name, or parent/name-2, -3, ... if taken: runs started in the same second must not
    share (or crash on) one folder. mkdir is atomic, so concurrent processes cannot both win a name."""
    parent.mkdir(parents=True, exist_ok=True)
    attempt = 1
    while True:
        folder = parent / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            attempt += 1
