"""Indexing an audio folder, searching it by text, and the result files (ranked CSV, similarity CSV, HTML page)."""
import csv
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from data_loaders.audio_cache import decode_audio
from search.index import chunks_of, read_index
from tests.test_experiment import run_demo

RATE = 32000


def test_long_files_are_cut_into_30_second_chunks():
    chunks, lengths = chunks_of(torch.ones(65 * RATE), 30 * RATE)
    assert chunks.shape == (3, 30 * RATE) and lengths.tolist() == [30 * RATE, 30 * RATE, 5 * RATE]
    assert chunks[2, 5 * RATE:].abs().sum() == 0
    chunks, lengths = chunks_of(torch.ones(100), 30 * RATE)
    assert chunks.shape == (1, 30 * RATE) and lengths.tolist() == [100]


def write_folder(folder: Path) -> Path:
    """Audio of several formats, rates, channel counts and lengths, and one file that is not audio."""
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    soundfile.write(folder / "stereo 44k.wav", rng.uniform(-0.3, 0.3, (5 * 44100, 2)), 44100)
    soundfile.write(folder / "sub" / "mono 16k.flac", rng.uniform(-0.3, 0.3, 3 * 16000), 16000)
    soundfile.write(folder / "short 48k.ogg", rng.uniform(-0.3, 0.3, 2 * 48000), 48000)
    soundfile.write(folder / "music.mp3", rng.uniform(-0.3, 0.3, 4 * 44100), 44100)
    soundfile.write(folder / "long.WAV", rng.uniform(-0.3, 0.3, 65 * RATE), RATE)
    (folder / "broken.wav").write_bytes(b"RIFF not really")
    (folder / "notes.txt").write_text("not audio")
    return folder


def index(data_dir, checkpoint, folder, index_file, **updates):
    return run_demo(data_dir, "cmd_index", load_model=str(checkpoint), index_audio=str(folder),
                    index_file=str(index_file), **updates).result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_dataset_template):
    """A one-epoch demo checkpoint (trained once for the module; tests only read it)."""
    data_dir = tmp_path_factory.mktemp("trained")
    shutil.copytree(tiny_dataset_template, data_dir / "clotho_demo")
    return Path(run_demo(data_dir).info["run_folder"]) / "checkpoints" / "last.ckpt"


def test_index_embeds_every_audio_file_then_only_what_changed(data_dir, checkpoint):
    folder, index_file = write_folder(data_dir / "recordings"), data_dir / "index.pt"
    first = index(data_dir, checkpoint, folder, index_file)
    assert (first["embedded"], first["unreadable"], first["dropped"]) == (5, ["broken.wav"], [])  # listed, not fatal
    stored = read_index(index_file)["files"]
    assert sorted(stored) == ["long.WAV", "music.mp3", "short 48k.ogg", "stereo 44k.wav", "sub/mono 16k.flac"]
    assert [len(stored[name]["windows"]) for name in ("long.WAV", "short 48k.ogg")] == [3, 1]  # 65 s: 3 chunks
    assert stored["stereo 44k.wav"]["seconds"] == pytest.approx(5.0)
    second = index(data_dir, checkpoint, folder, index_file)
    assert (second["embedded"], second["unchanged"]) == (0, 5)
    soundfile.write(folder / "short 48k.ogg", np.zeros(48000), 48000)  # changed
    (folder / "music.mp3").unlink()  # deleted
    shutil.copy(folder / "stereo 44k.wav", folder / "sub" / "new.wav")  # added
    third = index(data_dir, checkpoint, folder, index_file)
    assert (third["embedded"], third["unchanged"], third["dropped"]) == (2, 3, ["music.mp3"])
    updated = read_index(index_file)["files"]
    assert "sub/new.wav" in updated and updated["short 48k.ogg"]["mtime_ns"] != stored["short 48k.ogg"]["mtime_ns"]
    assert torch.equal(updated["long.WAV"]["windows"], stored["long.WAV"]["windows"])  # kept, not embedded again
    assert not list(data_dir.glob("*.partial*"))


def test_search_scores_each_file_by_its_best_chunk_and_writes_its_files(data_dir, checkpoint, tmp_path):
    from experiments.ex_dcase24 import ex, search_model

    folder, index_file = write_folder(data_dir / "recordings"), data_dir / "index.pt"
    index(data_dir, checkpoint, folder, index_file)
    queries = tmp_path / "queries.txt"
    queries.write_text("a dog barks\n\nrain falls on a roof\n")
    ranked = run_demo(data_dir, "cmd_search", index_file=str(index_file), queries_file=str(queries), top_k=3,
                      results_file=str(tmp_path / "ranked.csv"), similarity_file=str(tmp_path / "matrix.csv")).result
    assert len(ranked) == 2 and all(len(results) == 3 for results in ranked)
    assert all(results[0][1] >= results[1][1] >= results[2][1] for results in ranked)

    @ex.command(unobserved=True)
    def loaded_model():
        return search_model(str(checkpoint))[0]

    model = run_demo(data_dir, "loaded_model").result
    samples = torch.from_numpy(decode_audio(folder / "long.WAV", RATE))
    chunks, lengths = chunks_of(samples, 30 * RATE)
    with torch.no_grad():
        windows, mask = model.encode_audio(chunks, lengths)
        direct = model.pooling.score(model.encode_text(["a dog barks"]), windows, mask).max().item()
    with open(tmp_path / "matrix.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][0] == "query" and sorted(rows[0][1:]) == sorted(read_index(index_file)["files"])
    assert [row[0] for row in rows[1:]] == ["a dog barks", "rain falls on a roof"]
    assert float(rows[1][rows[0].index("long.WAV")]) == pytest.approx(direct, abs=1e-5)
    with open(tmp_path / "ranked.csv", newline="") as handle:
        ranked_rows = list(csv.DictReader(handle))
    assert [(row["query"], row["rank"], row["file"]) for row in ranked_rows[:3]] == [
        ("a dog barks", str(rank), name) for rank, (name, _) in enumerate(ranked[0], start=1)]


def test_an_index_of_another_model_or_other_settings_is_refused(data_dir, checkpoint):
    folder, index_file = write_folder(data_dir / "recordings"), data_dir / "index.pt"
    index(data_dir, checkpoint, folder, index_file)
    other = Path(run_demo(data_dir, seed=7).info["run_folder"]) / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="index.pt' was made by another model or other settings"):
        run_demo(data_dir, "cmd_search", index_file=str(index_file), query="a bell", load_model=str(other))
    with pytest.raises(ValueError, match="was made by another model or other settings"):
        run_demo(data_dir, "cmd_search", index_file=str(index_file), query="a bell", normalize=False)
    with pytest.raises(ValueError, match="was made by another model or other settings"):
        index(data_dir, other, folder, index_file)
    # Keys that only pick how the same function is computed do not count.
    (default,) = run_demo(data_dir, "cmd_search", index_file=str(index_file), query="a bell").result
    (same_function,) = run_demo(data_dir, "cmd_search", index_file=str(index_file), query="a bell",
                                audio_features__attention="explicit", audio_features__augment_on_device=True,
                                sentence_features__padding="max_length").result
    assert [name for name, _ in same_function] == [name for name, _ in default]
    assert [score for _, score in same_function] == pytest.approx([score for _, score in default], abs=1e-5)
    with pytest.raises(ValueError, match="needs query='...' or queries_file=PATH"):
        run_demo(data_dir, "cmd_search", index_file=str(index_file))


def test_results_page_renders_its_players_in_a_headless_browser(data_dir, checkpoint, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    folder, index_file = write_folder(data_dir / "recordings"), data_dir / "index.pt"
    index(data_dir, checkpoint, folder, index_file)
    page = tmp_path / "results.html"
    ranked = run_demo(data_dir, "cmd_search", index_file=str(index_file), query="a dog barks", top_k=4,
                      html_file=str(page)).result
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<audio") == 4 and "a dog barks" in dom
    for name, _ in ranked[0]:
        assert name in dom
    assert 'src="data:audio/' in dom  # self-contained: the audio is in the page
