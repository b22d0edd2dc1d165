"""`compile_cache`: what one process compiled, a fresh process on an empty machine reads instead of compiling."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_experiment import run_demo
from utils.compile_cache import load_compile_cache

REPO = Path(__file__).resolve().parents[1]
# One process: read the cache file, compile a small function, write the file again.
# Prints the number of artifacts read and written, and inductor's cache hits and misses.
PROCESS = """
import json, sys, torch
from torch._dynamo.utils import counters
from utils.compile_cache import load_compile_cache, save_compile_cache
path = sys.argv[1]
read = load_compile_cache(path)
nothing_yet = save_compile_cache(path)
torch.compile(lambda x: torch.nn.functional.gelu(x) * x.sin())(torch.linspace(-2, 2, 64))
inductor = counters["inductor"]
print(json.dumps({"read": read, "written_before": nothing_yet, "written": save_compile_cache(path),
                  "hits": inductor["fxgraph_cache_hit"], "misses": inductor["fxgraph_cache_miss"]}))
"""


def compile_in_fresh_process(cache_file: Path, cache_dir: Path) -> dict:
    """A new process whose own compilation caches (TORCHINDUCTOR_CACHE_DIR) start empty: a machine of its own."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    completed = subprocess.run([sys.executable, "-c", PROCESS, str(cache_file)], env=env, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.splitlines()[-1])


def test_a_fresh_machine_reads_what_another_compiled_instead_of_compiling(tmp_path):
    cache_file = tmp_path / "shared" / "compile_cache.bin"
    first = compile_in_fresh_process(cache_file, tmp_path / "machine_1")
    assert first["read"] == 0 and first["written_before"] == 0  # no file yet; nothing compiled yet, nothing written
    assert first["misses"] == 1 and first["hits"] == 0 and first["written"] >= first["misses"]
    size = cache_file.stat().st_size
    second = compile_in_fresh_process(cache_file, tmp_path / "machine_2")
    assert second["read"] == first["written"]
    assert second["misses"] == 0 and second["hits"] == 1  # the graph read, not compiled
    assert second["written"] == first["written"] and cache_file.stat().st_size == size  # the same, kept for the next
    assert [path.name for path in cache_file.parent.iterdir()] == ["compile_cache.bin"]  # no temporary file left


def test_a_damaged_cache_file_is_named(tmp_path):
    damaged = tmp_path / "compile_cache.bin"
    damaged.write_bytes(b"not a cache")
    with pytest.raises(ValueError, match=f"compile_cache='{damaged}': not a compile cache this torch can read"):
        load_compile_cache(damaged)
    assert load_compile_cache(tmp_path / "absent.bin") == 0


def test_a_run_reads_the_cache_before_building_its_model_and_writes_it_after_training_and_each_test(
        data_dir, monkeypatch):
    import experiments.checkpointing as checkpointing
    import experiments.ex_dcase24 as experiment
    from models.retrieval_model import RetrievalModel

    events = []
    real_build, real_evaluate = experiment.build_model, experiment.evaluate_checkpoint
    monkeypatch.setattr(RetrievalModel, "compile_encoders", lambda model, mode: events.append("compile"))
    monkeypatch.setattr(experiment, "load_compile_cache", lambda path: events.append(("read", path)) or 7)
    monkeypatch.setattr(checkpointing, "save_compile_cache", lambda path: events.append(("write", path)) or 9)
    monkeypatch.setattr(experiment, "build_model", lambda: events.append("build") or real_build())
    monkeypatch.setattr(experiment, "evaluate_checkpoint",
                        lambda *args: events.append("test") or real_evaluate(*args))
    cache = str(data_dir / "compile_cache.bin")
    run_demo(data_dir, compile=True, compile_cache=cache, max_epochs=2)
    # Once the first epoch has compiled training and validation (a run stopped later still leaves them), then
    # after each of the two test passes, which add the test split's graphs.
    write = ("write", cache)
    assert events == [("read", cache), "build", "compile", write, "test", write, "test", write]
