"""Default locations, free of any configuration framework so scripts can share them."""
from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> str:
    """$DATA_DIR if set, else ~/data: datasets, audio caches and run folders all live below it."""
    return os.environ.get("DATA_DIR") or str(Path.home() / "data")
