"""torch.compile's compiled graphs and kernels kept in one portable file (`compile_cache`).

torch already keeps them on disk (in /tmp/torchinductor_$USER), so a second run on the same machine compiles little;
a fresh machine (a cluster node whose /tmp starts empty, a lent GPU) compiles everything again, minutes for the two
transformers. Read at the start of a run, this file fills those caches first; written at its end, it holds what
the run compiled or read, for the next machine. It is valid for the same torch, Triton and GPU model only: other
entries are simply not hit, and compilation happens as without it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from utils.files import replaced_atomically


def _artifact_count(info) -> int:
    return sum(len(keys) for keys in info.artifacts.values())


def load_compile_cache(path: str | os.PathLike) -> int:
    """Puts the artifacts of `path` into this process's compilation caches; returns how many (0: no file yet).

    Raises ValueError naming the file if it exists but is not a compile cache torch can read."""
    path = Path(path).expanduser()
    if not path.is_file():
        return 0
    info = torch.compiler.load_cache_artifacts(path.read_bytes())
    if info is None:  # torch only logs a warning for a file it cannot parse
        raise ValueError(f"compile_cache={str(path)!r}: not a compile cache this torch can read (damaged, or not "
                         f"written by compile_cache); delete it or name another file")
    return _artifact_count(info)


def save_compile_cache(path: str | os.PathLike) -> int:
    """Writes every artifact this process compiled or loaded to `path` (whole or not at all); returns how many
    (0: nothing was compiled, and the file is left as it was)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return 0
    artifacts, info = saved
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as temporary:
        temporary.write_bytes(artifacts)
    return _artifact_count(info)
