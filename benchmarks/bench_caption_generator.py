"""Clips per second of the overcaptioning generator against a local server with a fixed answer delay.

    python -m benchmarks.bench_caption_generator [--clips 40] [--delay 0.25]

The server is the scripted Ollama HTTP server of the tests (127.0.0.1), so the figure measures the
generator's request pipeline, not a model.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import tempfile
import time
from pathlib import Path

from data_loaders.clotho_v2 import read_captions
from experiments.generate_captions_phi4 import main as generate
from tests.conftest import SHARED
from tests.ollama_server import ScriptedOllama


def write_inputs(folder: Path, clips: int) -> Path:
    published = read_captions(SHARED / "data" / "clotho_captions_development_plus_phi_generated.csv", 10)[:clips]
    captions = folder / "clotho_captions_development.csv"
    with open(captions, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["file_name"] + [f"caption_{i}" for i in range(1, 6)],
                                      *[[c.file_name, *c.captions[:5]] for c in published]])
    with open(folder / "clotho_metadata_development.csv", "w", newline="", encoding="ISO-8859-1") as handle:
        csv.writer(handle).writerows([["file_name", "keywords"], *[[c.file_name, "noise"] for c in published]])
    return captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--delay", type=float, default=0.25, help="seconds the server takes per answer")
    args = parser.parse_args()
    rates = {}
    with ScriptedOllama(delay_seconds=args.delay) as server:
        for concurrency in (1, 4):
            with tempfile.TemporaryDirectory() as folder:
                captions = write_inputs(Path(folder), args.clips)
                start = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    assert generate(["--captions", str(captions), "--host", server.host,
                                     "--concurrency", str(concurrency)]) == 0
                rates[concurrency] = args.clips / (time.perf_counter() - start)
    print(f"{args.clips} clips, {args.delay} s per answer: concurrency 1 {rates[1]:.2f} clips/s, "
          f"concurrency 4 (default) {rates[4]:.2f} clips/s, {rates[4] / rates[1]:.1f}x")


if __name__ == "__main__":
    main()
