"""Downloading and importing the real HDFS_v1 data set (network; for users, not tests).

The Loghub archive (186 MB zip, 1.5 GB ``HDFS.log``) is downloaded once, resumably, checked
against its published digest, and converted into ``sessions.jsonl`` (masked sessions and
labels), which :func:`feddale.data.sources.default_source` then picks up. Parsing the raw log
takes minutes, so it happens here and never on a run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from feddale.data.hdfs import SESSIONS_JSONL, load_raw_log, write_sessions_jsonl
from feddale.data.sources import default_data_dir

HDFS_V1_URL = "https://zenodo.org/records/8196385/files/HDFS_v1.zip?download=1"
HDFS_V1_MD5 = "76a24b4d9a6164d543fb275f89773260"  # published on the Zenodo record
ARCHIVE_NAME = "HDFS_v1.zip"
_CHUNK = 1 << 20


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(
    path: Path, *, size: int | None = None, sha256: str | None = None, md5: str | None = None
) -> None:
    """Raise ValueError unless ``path`` has the given size and digests (those not None)."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ValueError(f"{path}: expected {size} bytes, got {actual_size}")
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is not None:
            actual = _file_digest(path, algorithm)
            if actual != expected.lower():
                raise ValueError(f"{path}: {algorithm} is {actual}, expected {expected}")


def download(
    url: str,
    dest: Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial download when
    the server supports ranges; the file appears under its name only once verified."""
    if dest.is_file():
        verify_file(dest, size=size, sha256=sha256, md5=md5)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    have = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        resumed = have > 0 and getattr(response, "status", None) == 206
        if not resumed:
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length else None
        with (
            partial.open("ab" if resumed else "wb") as handle,
            tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=dest.name,
                disable=not progress,
            ) as bar,
        ):
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                handle.write(chunk)
                bar.update(len(chunk))
    try:
        verify_file(partial, size=size, sha256=sha256, md5=md5)
    except ValueError:
        partial.unlink()  # a corrupt partial file must not be resumed
        raise
    os.replace(partial, dest)
    return dest


def extract_hdfs(archive: Path, dest_dir: Path) -> tuple[Path, Path]:
    """Extract ``HDFS.log`` and ``anomaly_label.csv`` (found anywhere in the zip)."""
    wanted = {"HDFS.log": None, "anomaly_label.csv": None}
    with zipfile.ZipFile(archive) as bundle:
        for member in bundle.namelist():
            name = member.rsplit("/", 1)[-1]
            if name in wanted and wanted[name] is None:
                wanted[name] = member
        missing = [name for name, member in wanted.items() if member is None]
        if missing:
            raise ValueError(f"{archive} does not contain {missing}")
        dest_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, member in wanted.items():
            target = dest_dir / name
            temporary = target.with_name(f".{name}.part")
            with bundle.open(member) as source, temporary.open("wb") as sink:
                shutil.copyfileobj(source, sink, _CHUNK)
            os.replace(temporary, target)
            paths.append(target)
    return paths[0], paths[1]


def convert_raw(
    log_path: Path, label_path: Path | None, out_dir: Path, progress: bool = False
) -> Path:
    """Parse a raw HDFS log into ``out_dir/sessions.jsonl`` (masked sessions + labels)."""
    dataset = load_raw_log(log_path, label_path, progress=progress)
    return write_sessions_jsonl(dataset, out_dir / SESSIONS_JSONL)


def fetch_hdfs(
    dest_dir: str | os.PathLike[str],
    url: str = HDFS_V1_URL,
    sha256: str | None = None,
    md5: str | None = HDFS_V1_MD5,
    progress: bool = True,
) -> Path:
    """Download, verify, extract and import HDFS_v1 into ``dest_dir``; return ``dest_dir``.

    Keeps the archive (so a rerun needs no network) and removes the extracted 1.5 GB log
    once ``sessions.jsonl`` is written.
    """
    folder = Path(dest_dir).expanduser()
    archive = download(url, folder / ARCHIVE_NAME, sha256=sha256, md5=md5, progress=progress)
    log_path, label_path = extract_hdfs(archive, folder / "raw")
    convert_raw(log_path, label_path, folder, progress=progress)
    shutil.rmtree(folder / "raw")
    return folder


def fetch_main(dest: str | None) -> int:
    """``feddale data fetch hdfs [--dest DIR]``: exit status 0 on success, 1 on failure."""
    folder = Path(dest).expanduser() if dest else default_data_dir()
    try:
        fetch_hdfs(folder)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        print(f"feddale: fetching HDFS_v1 failed: {error}", file=sys.stderr)
        return 1
    print(f"HDFS_v1 imported into {folder / SESSIONS_JSONL}; it is now the default data set "
          f"(spec jsonl:{folder})")
    return 0
