"""Files written whole or not at all."""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling of `path` to write; renamed over `path` when the block succeeds, removed if not.

    An interrupted write leaves the old file or none. The name is unique per writer, so two processes writing one
    path never write into each other's file (the last rename wins, with a whole file); it ends in `path`'s suffix
    for writers that pick the format from it (matplotlib).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    with replaced_atomically(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
