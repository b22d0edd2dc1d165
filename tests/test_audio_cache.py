import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile
import torch

from data_loaders import audio_cache
from data_loaders.audio_cache import AudioCache, build_cache, stale_clips


@pytest.fixture
def audio_folder(tmp_path) -> Path:
    folder = tmp_path / "development"
    folder.mkdir()
    for index in range(3):
        seconds = np.arange(44100 * (index + 1)) / 44100
        soundfile.write(folder / f"clip {index}.wav", 0.5 * np.sin(2 * np.pi * 440 * (index + 1) * seconds), 44100)
    return folder


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def count_decodes(monkeypatch) -> list[str]:
    decoded = []
    original = audio_cache.decode_audio

    def counting(path, sample_rate):
        decoded.append(path.name)
        return original(path, sample_rate)
    monkeypatch.setattr(audio_cache, "decode_audio", counting)
    return decoded


def test_build_resample_and_reuse(audio_folder, tmp_path, monkeypatch):
    cache_path = tmp_path / "cache" / "development.h5"
    decoded = count_decodes(monkeypatch)
    build_cache(cache_path, audio_folder, names(audio_folder), 32000)
    assert sorted(decoded) == names(audio_folder)
    cache = AudioCache(cache_path)
    assert cache.length("clip 1.wav") == 64000  # 2 s at 32 kHz
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(32000) / 32000)
    np.testing.assert_allclose(cache.read("clip 0.wav")[1000:-1000], expected[1000:-1000], atol=2e-3)
    decoded.clear()
    build_cache(cache_path, audio_folder, names(audio_folder), 32000)
    assert decoded == []  # nothing decoded twice


def test_changed_source_and_rate_invalidate(audio_folder, tmp_path, monkeypatch):
    cache_path = tmp_path / "development.h5"
    build_cache(cache_path, audio_folder, names(audio_folder), 32000)
    soundfile.write(audio_folder / "clip 2.wav", np.zeros(44100 * 5), 44100)
    os.utime(audio_folder / "clip 2.wav", ns=(1, 1))
    assert stale_clips(cache_path, audio_folder, names(audio_folder), 32000) == ["clip 2.wav"]
    decoded = count_decodes(monkeypatch)
    build_cache(cache_path, audio_folder, names(audio_folder), 32000)
    assert decoded == ["clip 2.wav"]
    assert AudioCache(cache_path).length("clip 2.wav") == 5 * 32000
    assert stale_clips(cache_path, audio_folder, names(audio_folder), 16000) == names(audio_folder)


def test_interrupted_build_leaves_previous_cache_trusted(audio_folder, tmp_path):
    cache_path = tmp_path / "development.h5"
    build_cache(cache_path, audio_folder, names(audio_folder)[:2], 32000)
    before = cache_path.read_bytes()
    (audio_folder / "clip 2.wav").write_bytes(b"not audio")
    with pytest.raises(ValueError, match=r"cannot read audio file .*clip 2.wav"):
        build_cache(cache_path, audio_folder, names(audio_folder), 32000)
    assert cache_path.read_bytes() == before
    with h5py.File(cache_path) as cache:
        assert sorted(cache) == ["clip 0.wav", "clip 1.wav"]
    assert stale_clips(cache_path, audio_folder, names(audio_folder), 32000) == ["clip 2.wav"]


@pytest.mark.parametrize("frames, source_rate", [(44101, 44100), (16001, 16000), (48007, 48000), (32003, 32000),
                                                 (1150117, 44100)])  # the last decodes one sample short of exact
def test_decoded_length_from_the_header_matches_decoding(tmp_path, frames, source_rate):
    path = tmp_path / "odd.wav"
    soundfile.write(path, np.random.default_rng(0).uniform(-0.5, 0.5, frames), source_rate)
    decoded = len(audio_cache.decode_audio(path, 32000))
    assert abs(audio_cache.decoded_length(path, 32000) - decoded) <= 1
    assert stale_clips(build_cache(tmp_path / "c.h5", tmp_path, ["odd.wav"], 32000), tmp_path, ["odd.wav"],
                       32000) == []


def test_truncated_cache_is_named_and_rebuilt(audio_folder, tmp_path, monkeypatch):
    cache_path = tmp_path / "development.h5"
    build_cache(cache_path, audio_folder, names(audio_folder), 32000)
    expected = AudioCache(cache_path).read("clip 2.wav")
    cache_path.write_bytes(cache_path.read_bytes()[: cache_path.stat().st_size // 2])  # copied half-way
    with pytest.raises(OSError):
        h5py.File(cache_path, "r")
    decoded = count_decodes(monkeypatch)
    with pytest.warns(UserWarning, match=f"audio cache {cache_path} cannot be opened .*; rebuilding it"):
        build_cache(cache_path, audio_folder, names(audio_folder), 32000)
    assert sorted(decoded) == names(audio_folder)
    np.testing.assert_array_equal(AudioCache(cache_path).read("clip 2.wav"), expected)


def test_clip_of_the_wrong_length_is_decoded_again(audio_folder, tmp_path, monkeypatch):
    cache_path = tmp_path / "development.h5"
    build_cache(cache_path, audio_folder, names(audio_folder), 32000)
    with h5py.File(cache_path, "a") as cache:  # same source stamp, but half the samples (a damaged write)
        source = cache["clip 1.wav"].attrs["source"]
        del cache["clip 1.wav"]
        cache.create_dataset("clip 1.wav", data=np.zeros(32000, dtype=np.float32)).attrs["source"] = source
    decoded = count_decodes(monkeypatch)
    with pytest.warns(UserWarning, match=r"clip 'clip 1.wav' holds \(32000,\) samples, its source decodes to 64000"):
        build_cache(cache_path, audio_folder, names(audio_folder), 32000)
    assert decoded == ["clip 1.wav"] and AudioCache(cache_path).length("clip 1.wav") == 64000


def build_counting_decodes(cache_path: Path, audio_folder: Path, go, decoded) -> None:
    """One run of a sweep, in its own process: builds the cache once `go` is set, and reports what it decoded."""
    counted = []
    original = audio_cache.decode_audio
    audio_cache.decode_audio = lambda path, rate: counted.append(path.name) or original(path, rate)
    go.wait()
    build_cache(cache_path, audio_folder, names(audio_folder), 32000)
    decoded.put(counted)


def test_runs_started_together_take_turns_and_decode_each_clip_once(audio_folder, tmp_path, capfd):
    # A sweep of runs on a fresh data folder: each finds the cache missing; before the lock, both renamed the same
    # temporary file and the second crashed.
    import multiprocessing
    import time

    cache_path = tmp_path / "development.h5"
    context = multiprocessing.get_context("spawn")  # as separate runs are; a fork would share this one's lock
    decoded, go = context.Queue(), context.Event()
    builders = [context.Process(target=build_counting_decodes, args=(cache_path, audio_folder, go, decoded))
                for _ in range(2)]
    for builder in builders:
        builder.start()
    output = ""
    with audio_cache.exclusive_build(cache_path):  # held here until both runs queue on it
        go.set()
        deadline = time.monotonic() + 120
        while output.count(f"waiting for another process that is building {cache_path}") < 2:
            assert time.monotonic() < deadline, output
            time.sleep(0.05)
            output += capfd.readouterr().out
    counts = sorted([decoded.get(timeout=120), decoded.get(timeout=120)], key=len)
    for builder in builders:
        builder.join(60)
        assert builder.exitcode == 0
    assert counts[0] == [] and sorted(counts[1]) == names(audio_folder)
    assert stale_clips(cache_path, audio_folder, names(audio_folder), 32000) == []


def test_building_the_cache_leaves_the_random_numbers_of_the_run_alone(audio_folder, tmp_path):
    # The decoding DataLoader drew its workers' seed from torch's global generator: a run that built the cache
    # shuffled and initialised differently from the same run on the cache (make demo: mAP@10 0.43 vs 0.45).
    torch.manual_seed(0)
    build_cache(tmp_path / "cache.h5", audio_folder, names(audio_folder), 16000)
    after_building = torch.rand(3)
    torch.manual_seed(0)
    build_cache(tmp_path / "cache.h5", audio_folder, names(audio_folder), 16000)
    assert torch.equal(torch.rand(3), after_building)  # the second call found the cache and decoded nothing
