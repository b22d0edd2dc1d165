"""Overcaptioning: five more captions per Clotho development clip, written by Phi-4 through Ollama.

    ollama serve & ollama pull phi4
    python -m experiments.generate_captions_phi4 --concurrency 4

Each clip's five captions and its keywords go to the model after a fixed instruction; the answer
must be a numbered list of exactly five new captions (at most --max-words words, no digits), else the
clip is asked again. Answers are appended to a progress file as they arrive, so a killed run started
again with the same arguments resumes without asking again for a clip it already has. The output CSV
(file_name, caption_1..caption_10: Clotho's five, then the generated five, in the input's row order)
is written atomically at the end. Clips that still fail after the retries are reported, not written.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import ollama
from tqdm import tqdm

from data_loaders.clotho_v2 import PHI4_CAPTIONS_FILE, ClipCaptions, read_captions, read_metadata
from utils.cli import DefaultsHelpFormatter, bounded
from utils.paths import default_data_dir

GENERATED_PER_CLIP = 5
PROMPT = (
    "You are given five human-written captions of one audio clip and the clip's keywords, as JSON. "
    "Write exactly five new descriptions of the same audio. Each description has at most {max_words} words, "
    "preserves the meaning of the given captions, adds no sound event that is not present in them, and "
    "contains no numbers and no names. Answer only with a numbered list from 1. to 5., one description per "
    "line.\n\n"
)
_LIST_ITEM = re.compile(r"^\s*(\d+)[.)]\s*(.*?)\s*$")


class InvalidAnswer(ValueError):
    """The model's answer is not five usable captions; the clip is asked again."""


def request_text(clip: ClipCaptions, keywords: list[str], max_words: int) -> str:
    return PROMPT.format(max_words=max_words) + json.dumps({"captions": list(clip.captions), "keywords": keywords},
                                                           ensure_ascii=False)


def parse_answer(answer: str, max_words: int) -> list[str]:
    """The five captions of a numbered list, ignoring chatter around it; InvalidAnswer says why not."""
    items = [(int(match[1]), match[2].strip().strip('"')) for line in answer.splitlines()
             if (match := _LIST_ITEM.match(line))]
    numbers = [number for number, _ in items]
    if numbers != list(range(1, GENERATED_PER_CLIP + 1)):
        raise InvalidAnswer(f"expected items 1-{GENERATED_PER_CLIP}, got {numbers or 'no numbered list'}")
    captions = [text for _, text in items]
    for number, text in enumerate(captions, start=1):
        if not text:
            raise InvalidAnswer(f"item {number} is empty")
        if len(text.split()) > max_words:
            raise InvalidAnswer(f"item {number} has {len(text.split())} words (at most {max_words})")
        if any(character.isdigit() for character in text):
            raise InvalidAnswer(f"item {number} contains a digit")
    return captions


def _retryable(error: Exception) -> bool:
    if isinstance(error, ollama.ResponseError):
        return error.status_code >= 500 or error.status_code == 429
    return isinstance(error, (InvalidAnswer, ConnectionError, httpx.TransportError))


@dataclass
class Generator:
    client: ollama.Client
    model: str
    options: dict
    max_words: int
    retries: int
    backoff_seconds: float

    def captions_for(self, prompt: str) -> list[str]:
        """Ask until the answer is valid, backing off after transport and server errors."""
        attempt = 0
        while True:
            try:
                response = self.client.generate(model=self.model, prompt=prompt, options=self.options, stream=False)
                return parse_answer(response.response, self.max_words)
            except Exception as error:  # noqa: BLE001 - classified right below
                if not _retryable(error) or attempt == self.retries:
                    raise
                if not isinstance(error, InvalidAnswer):
                    time.sleep(self.backoff_seconds * 2 ** attempt)
                attempt += 1


def check_server(client: ollama.Client, host: str, model: str) -> None:
    """One line and the fixing command when the server or the model is missing, before any work."""
    try:
        available = [entry.model for entry in client.list().models]
    except (ConnectionError, httpx.TransportError):
        raise SystemExit(f"error: no Ollama server answers at {host}; start one with `ollama serve` "
                         f"(or pass --host / set OLLAMA_HOST)") from None
    if not any(name == model or name.split(":")[0] == model for name in available):
        raise SystemExit(f"error: model {model!r} is not pulled on {host}; run `ollama pull {model}`")


@dataclass
class Progress:
    """Append-only JSON-lines record of finished clips; its first line pins the run's settings."""
    path: Path
    settings: dict
    done: dict[str, list[str]] = field(default_factory=dict)

    def load(self) -> None:
        if not self.path.exists():
            self.path.write_text(json.dumps({"settings": self.settings}) + "\n", encoding="utf-8")
            return
        content = self.path.read_bytes()
        complete = content[:content.rfind(b"\n") + 1]
        if len(complete) < len(content):  # a line cut short by a kill: drop it, that clip is asked again
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))
        header, *records = [json.loads(line) for line in complete.decode("utf-8").splitlines()]
        if header.get("settings") != self.settings:
            raise SystemExit(f"error: {self.path} was written with other settings ({header.get('settings')}); "
                             f"delete it to start over, or rerun with the same arguments")
        self.done.update((record["file_name"], record["captions"]) for record in records)

    def add(self, file_name: str, captions: list[str]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"file_name": file_name, "captions": captions}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.done[file_name] = captions


def write_output(path: Path, clips: list[ClipCaptions], generated: dict[str, list[str]]) -> int:
    """The 10-caption CSV, in input order, for the clips that have generated captions; atomic."""
    header = ["file_name"] + [f"caption_{i}" for i in range(1, 2 * GENERATED_PER_CLIP + 1)]
    rows = [[clip.file_name, *clip.captions, *generated[clip.file_name]] for clip in clips
            if clip.file_name in generated]
    handle = tempfile.NamedTemporaryFile("w", newline="", encoding="utf-8", dir=path.parent,
                                         prefix=f".{path.name}.", delete=False)
    with handle:
        csv.writer(handle).writerows([header, *rows])
    os.replace(handle.name, path)
    return len(rows)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    default_folder = Path(default_data_dir()) / "clotho_v2"
    parser.add_argument("--captions", type=Path, default=default_folder / "clotho_captions_development.csv",
                        help="Clotho development captions CSV")
    parser.add_argument("--metadata", type=Path, help="metadata CSV (default: clotho_metadata_development.csv "
                                                      "beside --captions)")
    parser.add_argument("--output", type=Path, help=f"output CSV (default: {PHI4_CAPTIONS_FILE} beside --captions)")
    parser.add_argument("--progress", type=Path, help="progress file (default: the output path + .progress.jsonl)")
    parser.add_argument("--host", default=os.environ.get("OLLAMA_HOST") or "http://127.0.0.1:11434",
                        help="Ollama server (OLLAMA_HOST)")
    parser.add_argument("--model", default="phi4", help="Ollama model")
    parser.add_argument("--temperature", type=bounded(float, 0), default=0.8, help="sampling temperature")
    parser.add_argument("--seed", type=int, help="generation seed, an Ollama option (default: none sent)")
    parser.add_argument("--max-words", type=bounded(int, 1), default=20,
                        help="words per caption at most; longer answers are asked again")
    parser.add_argument("--concurrency", type=bounded(int, 1), default=4, help="requests in flight")
    parser.add_argument("--retries", type=bounded(int, 0), default=4, help="extra attempts per clip")
    parser.add_argument("--timeout", type=bounded(float, 0, inclusive=False), default=300.0,
                        help="seconds per request")
    parser.add_argument("--backoff", type=bounded(float, 0), default=1.0,
                        help="first back-off in seconds, doubled per retry")
    parser.add_argument("--limit", type=bounded(int, 1), help="only the first N clips, a trial (default: all)")
    args = parser.parse_args(argv)
    args.metadata = args.metadata or args.captions.with_name("clotho_metadata_development.csv")
    args.output = args.output or args.captions.with_name(PHI4_CAPTIONS_FILE)
    args.progress = args.progress or args.output.with_name(args.output.name + ".progress.jsonl")
    for flag, path in (("--output", args.output), ("--progress", args.progress)):
        if not path.parent.is_dir():
            parser.error(f"{flag} {path}: folder {path.parent} does not exist (create it first)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        clips = read_captions(args.captions)[:args.limit]
        keywords = read_metadata(args.metadata)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    missing = [clip.file_name for clip in clips if clip.file_name not in keywords]
    if missing:
        raise SystemExit(f"error: {args.metadata} has no row for {len(missing)} clip(s) of {args.captions}, "
                         f"e.g. {missing[0]!r}")
    client = ollama.Client(host=args.host, timeout=args.timeout)
    check_server(client, args.host, args.model)
    options = {"temperature": args.temperature, **({"seed": args.seed} if args.seed is not None else {})}
    progress = Progress(args.progress, {"model": args.model, "options": options, "max_words": args.max_words,
                                        "captions": str(args.captions.resolve())})
    progress.load()
    generator = Generator(client, args.model, options, args.max_words, args.retries, args.backoff)
    pending = [clip for clip in clips if clip.file_name not in progress.done]
    failures: dict[str, str] = {}
    bar = tqdm(total=len(clips), initial=len(clips) - len(pending), unit="clip", desc="captions")
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        queue = iter(pending)
        running = {}
        while True:
            while len(running) < args.concurrency and (clip := next(queue, None)) is not None:
                prompt = request_text(clip, keywords[clip.file_name], args.max_words)
                running[pool.submit(generator.captions_for, prompt)] = clip
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                clip = running.pop(future)
                try:
                    progress.add(clip.file_name, future.result())
                except Exception as error:  # noqa: BLE001 - every failure is reported per clip
                    failures[clip.file_name] = f"{type(error).__name__}: {error}"
                bar.update()
                bar.set_postfix(done=len(progress.done), failed=len(failures))
    bar.close()
    written = write_output(args.output, clips, progress.done)
    print(f"wrote {written} clips to {args.output}; {len(failures)} failed")
    for file_name, reason in failures.items():
        print(f"  failed: {file_name}: {reason}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
