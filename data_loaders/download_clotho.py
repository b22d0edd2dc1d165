"""Fetch, verify and unpack Clotho v2.1 into the layout the `clotho_v2` ingredient reads.

    python -m data_loaders.download_clotho [--data-dir DIR] [--folder-name clotho_v2] [--with-phi4-captions]

Files come from CLOTHO_BASE_URL (default: the Zenodo record 4783391) and must match the MD5 sums of
the manifest beside this file (CLOTHO_CHECKSUMS overrides its path). Partial downloads resume with
HTTP range requests; files already present and verified are not fetched again; a file whose checksum
fails is fetched again and never unpacked. Archives are unpacked into a temporary folder that is
renamed into place, so an interrupted run leaves no half-unpacked split behind.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from data_loaders.clotho_v2 import PHI4_CAPTIONS_FILE, SPLITS
from utils.cli import DefaultsHelpFormatter
from utils.paths import default_data_dir

DEFAULT_BASE_URL = "https://zenodo.org/records/4783391/files"
DEFAULT_PHI4_URL = ("https://raw.githubusercontent.com/timoniko/PR-Text-To-Audio-Retrieval/main/clotho_v2/"
                    + PHI4_CAPTIONS_FILE)
MANIFEST = Path(__file__).with_name("clotho_v2.1.md5")
CHUNK_BYTES = 1 << 20
ATTEMPTS = 4


def read_manifest(path: Path) -> dict[str, str]:
    """file name -> MD5 from an `md5sum`-format file."""
    if not path.is_file():
        raise FileNotFoundError(f"checksum manifest not found: {path} (CLOTHO_CHECKSUMS)")
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            parts = line.split()
            if len(parts) != 2 or len(parts[0]) != 32:
                raise ValueError(f"{path}, line {number}: expected '<md5>  <file name>', got {line!r}")
            sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_once(url: str, partial: Path) -> None:
    """Append the rest of `url` to `partial`, asking the server to resume where it stopped."""
    offset = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416:  # nothing left to send: the partial file is already complete
            return
        raise
    with response:
        if offset and response.status != 206:  # the server ignored the range: start over
            offset = 0
        total = int(response.headers.get("Content-Length", 0)) + offset
        with open(partial, "ab" if offset else "wb") as handle, \
                tqdm(total=total or None, initial=offset, unit="B", unit_scale=True, desc=partial.stem) as bar:
            while chunk := response.read(CHUNK_BYTES):
                handle.write(chunk)
                bar.update(len(chunk))
            if total and handle.tell() < total:
                raise ConnectionError(f"connection closed after {handle.tell()} of {total} bytes")


def download(url: str, target: Path, expected_md5: str) -> str:
    """Make `target` a verified copy of `url`; returns what was done ('present' or 'downloaded')."""
    if target.exists() and md5_of(target) == expected_md5:
        return "present"
    if target.exists():
        print(f"{target.name}: checksum mismatch, fetching again")
        target.unlink()
    partial = target.with_name(target.name + ".part")
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _fetch_once(url, partial)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
            if attempt == ATTEMPTS:
                raise RuntimeError(f"could not download {url} ({error}); run again to resume") from None
            time.sleep(min(30, 2 ** (attempt - 1)))
            continue
        if md5_of(partial) == expected_md5:
            os.replace(partial, target)
            return "downloaded"
        print(f"{target.name}: checksum mismatch after download, fetching again")
        partial.unlink()
    raise RuntimeError(f"{url}: checksum still wrong after {ATTEMPTS} attempts (expected {expected_md5})")


def extract_split(archive: Path, folder: Path, split: str) -> bool:
    """Unpack `archive` into folder/split (renamed into place at the end); False if already there."""
    destination = folder / split
    if destination.is_dir():
        return False
    import py7zr

    staging = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=folder))
    try:
        with py7zr.SevenZipFile(archive) as seven_zip:
            seven_zip.extractall(path=staging)
        entries = list(staging.iterdir())
        unpacked = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
        os.replace(unpacked, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(default_data_dir()), help="directories.data_dir")
    parser.add_argument("--folder-name", default="clotho_v2", help="clotho_v2.folder_name")
    parser.add_argument("--with-phi4-captions", action="store_true",
                        help=f"also fetch the published {PHI4_CAPTIONS_FILE}")
    args = parser.parse_args(argv)
    base_url = os.environ.get("CLOTHO_BASE_URL", DEFAULT_BASE_URL).rstrip("/")
    manifest = Path(os.environ.get("CLOTHO_CHECKSUMS", MANIFEST))
    sums = read_manifest(manifest)
    files = {split: (f"clotho_captions_{split}.csv", f"clotho_metadata_{split}.csv", f"clotho_audio_{split}.7z")
             for split in SPLITS.values()}
    needed = [name for names in files.values() for name in names] + [PHI4_CAPTIONS_FILE] * args.with_phi4_captions
    absent = [name for name in needed if name not in sums]
    if absent:
        parser.error(f"checksum manifest {manifest} (CLOTHO_CHECKSUMS) has no entry for {', '.join(absent)}")
    if not base_url.startswith(("http://", "https://")):
        parser.error(f"CLOTHO_BASE_URL={base_url!r}: expected an http:// or https:// address")
    folder = args.data_dir.expanduser() / args.folder_name
    for path in (args.data_dir.expanduser(), folder):
        if path.exists() and not path.is_dir():
            parser.error(f"{path} exists and is not a folder (--data-dir / --folder-name)")
    folder.mkdir(parents=True, exist_ok=True)
    report = []
    for split, names in files.items():
        for name in names:
            report.append(f"{name}: {download(f'{base_url}/{name}', folder / name, sums[name])}")
        extracted = extract_split(folder / f"clotho_audio_{split}.7z", folder, split)
        files = sum(1 for _ in (folder / split).iterdir())
        report.append(f"{split}/: {files} audio files ({'unpacked now' if extracted else 'already unpacked'})")
    if args.with_phi4_captions:
        url = os.environ.get("PHI4_CAPTIONS_URL", DEFAULT_PHI4_URL)
        report.append(f"{PHI4_CAPTIONS_FILE}: {download(url, folder / PHI4_CAPTIONS_FILE, sums[PHI4_CAPTIONS_FILE])}")
    print(f"Clotho v2.1 in {folder}:")
    print("\n".join(f"  {line}" for line in report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
