"""scripts/download_clothov2.sh end to end against a local HTTP mirror with range requests."""
import hashlib
import os
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import py7zr
import pytest
import soundfile

from data_loaders.clotho_v2 import check_audio_files, read_captions
from data_loaders.download_clotho import MANIFEST, read_manifest
from tests.conftest import SHARED

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("development", "validation", "evaluation")
PHI4 = SHARED / "data" / "clotho_captions_development_plus_phi_generated.csv"


class Mirror:
    """Serves files from memory; honours `Range: bytes=N-`; can cut one response short or corrupt it."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: dict[str, int] = {}  # name -> bytes sent before the connection drops (once)
        self.corrupt_once: set[str] = set()
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                mirror.requests.append((name, self.headers.get("Range")))
                if name not in mirror.files:
                    self.send_error(404)
                    return
                body = mirror.files[name]
                if name in mirror.corrupt_once:
                    mirror.corrupt_once.discard(name)
                    body = b"x" + body[1:]
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if name in mirror.cut_after:
                    self.wfile.write(body[start:start + mirror.cut_after.pop(name)])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/files"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def downloads(self) -> list[str]:
        return [name for name, _ in self.requests]


@pytest.fixture
def mirror(tmp_path):
    """Small archives and CSVs with Clotho's names and structure, plus a matching manifest."""
    files = {}
    rng = np.random.default_rng(0)
    build = tmp_path / "build"
    for split in SPLITS:
        names = [f"{split} clip {i}.wav" for i in range(3)]
        (build / split).mkdir(parents=True)
        for name in names:
            soundfile.write(build / split / name, rng.uniform(-0.1, 0.1, 44100 * 2), 44100)
        archive = build / f"clotho_audio_{split}.7z"
        with py7zr.SevenZipFile(archive, "w") as seven_zip:
            seven_zip.writeall(build / split, split)
        files[archive.name] = archive.read_bytes()
        header = "file_name," + ",".join(f"caption_{i}" for i in range(1, 6))
        files[f"clotho_captions_{split}.csv"] = "\n".join(
            [header] + [f"{name},a,b,c,d,e" for name in names]).encode() + b"\n"
        files[f"clotho_metadata_{split}.csv"] = "\n".join(
            ["file_name,keywords"] + [f"{name},caf\xe9" for name in names]).encode("ISO-8859-1") + b"\n"
    files[PHI4.name] = PHI4.read_bytes()  # the published captions, whose sum the repo's manifest holds
    manifest = tmp_path / "checksums.md5"
    manifest.write_text("".join(f"{hashlib.md5(body).hexdigest()}  {name}\n" for name, body in files.items()))
    server = Mirror(files)
    yield server, manifest
    server.server.shutdown()


def run_script(mirror_and_manifest, data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    server, manifest = mirror_and_manifest
    env = {**os.environ, "CLOTHO_BASE_URL": server.url, "CLOTHO_CHECKSUMS": str(manifest), "PYTHONPATH": str(REPO),
           "PHI4_CAPTIONS_URL": f"{server.url}/{PHI4.name}"}
    return subprocess.run(["bash", str(REPO / "scripts" / "download_clothov2.sh"), "--data-dir", str(data_dir),
                           *extra], env=env, capture_output=True, text=True, timeout=300)


def test_clean_run_then_rerun_downloads_nothing(mirror, tmp_path):
    server, _ = mirror
    completed = run_script(mirror, tmp_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    folder = tmp_path / "clotho_v2"
    for split in SPLITS:
        clips = read_captions(folder / f"clotho_captions_{split}.csv")
        check_audio_files(clips, folder / split, folder / f"clotho_captions_{split}.csv")
    assert "development/: 3 audio files (unpacked now)" in completed.stdout
    assert len(server.requests) == 9
    again = run_script(mirror, tmp_path)
    assert again.returncode == 0 and len(server.requests) == 9  # nothing fetched twice
    assert "clotho_audio_evaluation.7z: present" in again.stdout and "already unpacked" in again.stdout


def test_interrupted_download_resumes_with_a_range_request(mirror, tmp_path):
    server, _ = mirror
    name = "clotho_audio_validation.7z"
    server.cut_after[name] = 1000
    completed = run_script(mirror, tmp_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert [rng for n, rng in server.requests if n == name] == [None, "bytes=1000-"]
    assert (tmp_path / "clotho_v2" / name).read_bytes() == server.files[name]
    assert not (tmp_path / "clotho_v2" / (name + ".part")).exists()


def test_corrupted_file_is_fetched_again_not_extracted(mirror, tmp_path):
    server, _ = mirror
    folder = tmp_path / "clotho_v2"
    folder.mkdir()
    (folder / "clotho_audio_evaluation.7z").write_bytes(b"truncated")  # e.g. a copy broken earlier
    server.corrupt_once.add("clotho_audio_development.7z")  # and a download damaged in transit
    completed = run_script(mirror, tmp_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "clotho_audio_evaluation.7z: checksum mismatch, fetching again" in completed.stdout
    assert "clotho_audio_development.7z: checksum mismatch after download" in completed.stdout
    assert server.downloads().count("clotho_audio_development.7z") == 2
    for split in SPLITS:
        assert sorted(p.name for p in (folder / split).iterdir()) == [f"{split} clip {i}.wav" for i in range(3)]


def test_published_phi4_captions_come_with_their_checksum(mirror, tmp_path):
    assert read_manifest(MANIFEST)[PHI4.name] == hashlib.md5(PHI4.read_bytes()).hexdigest()
    completed = run_script(mirror, tmp_path, "--with-phi4-captions")
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert f"{PHI4.name}: downloaded" in completed.stdout
    assert (tmp_path / "clotho_v2" / PHI4.name).read_bytes() == PHI4.read_bytes()


def test_bad_manifest_line_is_named(mirror, tmp_path):
    server, manifest = mirror
    manifest.write_text("not-a-checksum clotho_audio_development.7z\n")
    completed = run_script(mirror, tmp_path)
    assert completed.returncode != 0
    assert "line 1: expected '<md5>  <file name>'" in completed.stderr
