"""The overcaptioning generator against a real HTTP server that speaks Ollama's API on 127.0.0.1."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_loaders.clotho_v2 import read_augmented_captions, read_captions
from experiments.generate_captions_phi4 import InvalidAnswer, main, parse_answer, parse_arguments
from tests.conftest import SHARED
from tests.ollama_server import ScriptedOllama, good_answer

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = SHARED / "data" / "clotho_captions_development_plus_phi_generated.csv"


@pytest.fixture
def clotho_csvs(tmp_path):
    """The first clips of the published CSV as a Clotho development captions CSV plus metadata."""
    def make(count: int) -> tuple[Path, list]:
        clips = read_captions(PUBLISHED, captions_per_clip=10)[:count]
        captions = tmp_path / "clotho_captions_development.csv"
        with open(captions, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([["file_name"] + [f"caption_{i}" for i in range(1, 6)],
                                          *[[c.file_name, *c.captions[:5]] for c in clips]])
        with open(tmp_path / "clotho_metadata_development.csv", "w", newline="", encoding="ISO-8859-1") as handle:
            csv.writer(handle).writerows([["file_name", "keywords"], *[[c.file_name, "café;noise"] for c in clips]])
        return captions, clips
    return make


def test_parse_answer():
    assert parse_answer("Here:\n1. a b\n2) c d\n3. e\n4. f\n5. g\nThanks", 20) == ["a b", "c d", "e", "f", "g"]
    for answer, reason in [("1. a\n2. b\n3. c\n4. d", "expected items 1-5"),
                           ("1. a\n2. b\n3. c\n4. d\n5. e\n6. f", "expected items 1-5"),
                           ("1. a\n2. b\n3. c 3 dogs\n4. d\n5. e", "item 3 contains a digit"),
                           ("1. a\n2.\n3. c\n4. d\n5. e", "item 2 is empty"),
                           ("1. " + "word " * 21 + "\n2. b\n3. c\n4. d\n5. e", "item 1 has 21 words")]:
        with pytest.raises(InvalidAnswer, match=reason):
            parse_answer(answer, 20)


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_help_states_each_default_once(capsys):
    # Defaults worked out from another option are None to argparse; their help says what they are instead.
    with pytest.raises(SystemExit):
        parse_arguments(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in help_text
    assert "metadata CSV (default: clotho_metadata_development.csv beside --captions) --output" in help_text
    assert "Ollama model (default: phi4)" in help_text and "requests in flight (default: 4)" in help_text


def test_every_kind_of_answer_and_failure(clotho_csvs, tmp_path, capsys):
    captions, clips = clotho_csvs(9)
    behaviours = [["ok"], ["chatter"], ["four", "ok"], ["six", "ok"], ["digits", "long", "ok"], ["500", "ok"],
                  ["hang", "ok"], ["drop", "ok"], ["four"]]
    with ScriptedOllama(hang_seconds=3) as server:
        for clip, script in zip(clips, behaviours):
            server.scripts[clip.captions[0]] = list(script)
        code = main(["--captions", str(captions), "--host", server.host, "--concurrency", "3", "--retries", "3",
                     "--timeout", "1", "--backoff", "0.01"])
    output = capsys.readouterr().out
    assert code == 1
    assert "wrote 8 clips" in output and "1 failed" in output
    assert f"failed: {clips[8].file_name}: InvalidAnswer: expected items 1-5, got [1, 2, 3, 4]" in output
    rows = read_rows(captions.with_name("clotho_captions_development_plus_phi_generated.csv"))
    assert rows[0] == ["file_name"] + [f"caption_{i}" for i in range(1, 11)]
    assert [row[0] for row in rows[1:]] == [clip.file_name for clip in clips[:8]]  # input order, retried included
    for row, clip in zip(rows[1:], clips):
        assert row[1:6] == list(clip.captions[:5])
        assert "\n".join(f"{i}. {text}" for i, text in enumerate(row[6:], start=1)) == good_answer(clip.captions[0])
    # and the output is what training reads
    development = read_captions(captions)[:8]
    assert all(len(c.captions) == 10 for c in read_augmented_captions(
        captions.with_name("clotho_captions_development_plus_phi_generated.csv"), development))


def test_missing_server_or_model_is_one_line_before_work(clotho_csvs, tmp_path):
    captions, _ = clotho_csvs(2)
    with ScriptedOllama(models=["llama3:latest"]) as server:
        with pytest.raises(SystemExit, match=r"model 'phi4' is not pulled on .*; run `ollama pull phi4`"):
            main(["--captions", str(captions), "--host", server.host])
        assert server.requests == []
    with pytest.raises(SystemExit, match=r"no Ollama server answers at http://127.0.0.1:9; start one with `ollama serve`"):
        main(["--captions", str(captions), "--host", "http://127.0.0.1:9"])
    assert not captions.with_name("clotho_captions_development_plus_phi_generated.csv").exists()


def run_generator(captions: Path, host: str, output: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.generate_captions_phi4", "--captions", str(captions),
                             "--host", host, "--output", str(output), "--concurrency", "2", "--seed", "7"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_killed_run_resumes_without_asking_again(clotho_csvs, tmp_path):
    captions, clips = clotho_csvs(16)
    with ScriptedOllama(delay_seconds=0.25) as server:
        reference = tmp_path / "uninterrupted.csv"
        assert run_generator(captions, server.host, reference).wait(timeout=120) == 0

        output = tmp_path / "resumed.csv"
        progress = output.with_name(output.name + ".progress.jsonl")
        first = run_generator(captions, server.host, output)
        deadline = time.time() + 60
        while time.time() < deadline and (not progress.exists() or progress.read_text().count("\n") < 6):
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert not output.exists()  # nothing half-written in place of the output
        written = {json.loads(line)["file_name"] for line in progress.read_text().splitlines()[1:]
                   if line.strip().endswith("}")}
        assert 5 <= len(written) < len(clips)
        restarted_at = time.time()
        assert run_generator(captions, server.host, output).wait(timeout=120) == 0
    asked_after_restart = {key for when, key in server.requests if when >= restarted_at}
    first_captions = {clip.captions[0]: clip.file_name for clip in clips}
    assert not {first_captions[key] for key in asked_after_restart} & written
    assert output.read_bytes() == reference.read_bytes()
