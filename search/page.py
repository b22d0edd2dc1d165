"""Search results as files: a ranked CSV, the full query x file similarity CSV (DCASE 2025's submission format), and
one self-contained HTML page with a player per result (the audio embedded, so the page needs no server)."""
from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

import torch

from utils.files import write_text_atomically

MIME_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg"}


def _csv_text(rows: list[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def write_ranked_csv(path: Path, queries: list[str], ranked: list[list[tuple[str, float]]]) -> None:
    rows = [["query", "rank", "file", "score"]]
    rows += [[query, rank, name, f"{score:.6f}"] for query, results in zip(queries, ranked)
             for rank, (name, score) in enumerate(results, start=1)]
    write_text_atomically(path, _csv_text(rows))


def write_similarity_csv(path: Path, queries: list[str], files: list[str], scores: torch.Tensor) -> None:
    """One row per query, one column per file (DCASE 2025 task 6 submission format)."""
    rows = [["query", *files]] + [[query, *(f"{value:.6f}" for value in row)]
                                  for query, row in zip(queries, scores.tolist())]
    write_text_atomically(path, _csv_text(rows))


def render_page(folder: Path, queries: list[str], ranked: list[list[tuple[str, float]]]) -> str:
    sections = []
    for query, results in zip(queries, ranked):
        items = []
        for rank, (name, score) in enumerate(results, start=1):
            path = folder / name
            audio = base64.b64encode(path.read_bytes()).decode("ascii")
            mime = MIME_TYPES.get(path.suffix.lower(), "audio/wav")
            items.append(f'<li><span class="rank">{rank}</span> <span class="score">{score:.3f}</span> '
                         f'<span class="file">{html.escape(name)}</span><br>'
                         f'<audio controls preload="none" src="data:{mime};base64,{audio}"></audio></li>')
        sections.append(f'<section><h2>{html.escape(query)}</h2><ol>{"".join(items)}</ol></section>')
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Audio search</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:60em}h2{font-size:1.1em}ol{list-style:none;padding:0}"
            "li{margin:.6em 0}.rank{font-weight:bold}.score{color:#555}.file{font-family:monospace}"
            f"</style></head><body><h1>Audio search: {html.escape(str(folder))}</h1>{''.join(sections)}</body></html>")
