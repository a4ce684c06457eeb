"""Download, verify and unpack the public MovieLens archives.

``download_dataset("movielens-100k", "data")`` fetches
``https://files.grouplens.org/datasets/movielens/ml-100k.zip`` and returns
``data/ml-100k`` (the folder the zip holds), ready for
:func:`features.sources.movielens.read_movielens`. Steps:

1. **resumable transfer** into ``<dest>/<zip>.part``: a retry (or a later
   call) asks for ``Range: bytes=<size of .part>-`` and appends on ``206``;
   a server that ignores Range answers ``200`` and the part is rewritten from
   byte 0. Transient errors (dropped connections, timeouts, 5xx) are retried
   with exponential backoff (tenacity), each retry resuming where it stopped.
2. **verification** against the sha256 pinned in :data:`REGISTRY`: a mismatch
   deletes the part (so nothing resumes from or trusts bad bytes) and raises
   :class:`~infra.errors.SourceError` naming the file and both hashes.
3. **atomic extraction**: into a hidden temporary folder beside the target,
   then one ``os.replace`` onto ``<dest>/<folder>``, with a marker file
   recording the archive hash; a folder with a matching marker is reused, so a
   second call downloads nothing.

Hashes (sha256 and size of each zip) are those in TensorFlow Datasets'
``tensorflow_datasets/url_checksums/movielens.txt`` (commit 1c076ac3),
cross-checked against independent projects that pin the same values, and,
for 100K/1M/25M, against the md5 GroupLens publishes beside each zip
(``<zip>.md5``), kept here as ``md5`` for reference. ``ml-latest-small`` is
a rolling release: the pin is the 2018-09-26 snapshot, and GroupLens
republishing it would fail verification loudly, by design.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from infra.errors import SourceError

GROUPLENS_BASE_URL = "https://files.grouplens.org/datasets/movielens"
MARKER_FILE = ".rayrec-download.json"
_USER_AGENT = "rayrec-downloader/1"


@dataclass(frozen=True)
class RemoteArchive:
    """One published zip: where it is, what it must hash to, what it unpacks to."""

    filename: str
    sha256: str
    size: int
    # Folder at the top of the zip (the dataset folder returned to the caller).
    folder: str
    # GroupLens' own published md5 (<zip>.md5), for reference; None where not published.
    md5: str | None = None


REGISTRY: dict[str, RemoteArchive] = {
    "movielens-100k": RemoteArchive(
        "ml-100k.zip",
        sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        size=4_924_029,
        folder="ml-100k",
        md5="0e33842e24a9c977be4e0107933c0723",
    ),
    "movielens-1m": RemoteArchive(
        "ml-1m.zip",
        sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        size=5_917_549,
        folder="ml-1m",
        md5="c4d9eecfca2ab87c1945afe126590906",
    ),
    "movielens-25m": RemoteArchive(
        "ml-25m.zip",
        sha256="8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa",
        size=261_978_986,
        folder="ml-25m",
        md5="6b51fb2759a8657d3bfcbfc42b592ada",
    ),
    "ml-latest-small": RemoteArchive(
        "ml-latest-small.zip",
        sha256="696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
        size=978_202,
        folder="ml-latest-small",
    ),
}


class _TransientError(Exception):
    """A transfer problem worth retrying (the next attempt resumes)."""


def download_dataset(
    name: str,
    dest_dir: str | Path,
    base_url: str | None = None,
    *,
    expected_sha256: str | None = None,
    max_attempts: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    chunk_bytes: int = 1 << 20,
) -> Path:
    """Fetch dataset ``name`` into ``dest_dir`` and return its extracted folder.

    ``base_url`` replaces :data:`GROUPLENS_BASE_URL` (a mirror, or a local
    server in tests); the file name stays the registry's. ``expected_sha256``
    replaces the pinned hash, for a mirror that serves a re-packed archive or
    a test archive; leave it None to verify against the registry.
    ``backoff_s`` is the first retry's wait (doubling, capped at 30 s).
    """
    if name not in REGISTRY:
        raise SourceError(f"unknown dataset {name!r}; known: {', '.join(sorted(REGISTRY))}")
    archive = REGISTRY[name]
    sha256 = (expected_sha256 or archive.sha256).lower()
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / archive.folder
    if _marker_sha256(target) == sha256:
        return target
    if target.exists():
        raise SourceError(
            f"{target} exists but is not a verified download of {archive.filename}; "
            "move it away or delete it"
        )

    url = f"{(base_url or GROUPLENS_BASE_URL).rstrip('/')}/{archive.filename}"
    if not url.startswith(("http://", "https://")):
        raise SourceError(f"{url}: only http(s) URLs are downloaded")
    part = dest / f"{archive.filename}.part"
    retrying = Retrying(
        stop=stop_after_attempt(max_attempts),
        wait=wait_exponential(multiplier=backoff_s, max=30.0),
        retry=retry_if_exception(lambda exc: isinstance(exc, _TransientError)),
        reraise=True,
    )
    try:
        retrying(_fetch_into, url, part, timeout_s, chunk_bytes)
    except _TransientError as exc:
        raise SourceError(
            f"{url}: download failed after {max_attempts} attempts ({exc}); "
            f"{part.name} keeps {_size(part):,} bytes and the next call resumes from there"
        ) from None

    actual = file_sha256(part)
    if actual != sha256:
        part.unlink(missing_ok=True)
        raise SourceError(
            f"{archive.filename} from {url}: sha256 mismatch: expected {sha256}, got {actual}; "
            "the download was deleted"
        )
    _extract_atomically(part, target, archive.folder, sha256)
    part.unlink(missing_ok=True)
    return target


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- transfer


def _fetch_into(url: str, part: Path, timeout_s: float, chunk_bytes: int) -> None:
    """One attempt: continue ``part`` from its current size to the end of ``url``."""
    offset = _size(part)
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # Range past the end: the part already holds the whole file (verified next).
            return
        if exc.code >= 500 or exc.code == 429:
            raise _TransientError(f"HTTP {exc.code}") from None
        raise SourceError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise _TransientError(str(exc)) from None
    with response:
        resumed = offset > 0 and response.status == 206
        # 200 to a Range request: the server ignored it and sends everything again.
        mode = "ab" if resumed else "wb"
        expected = response.headers.get("Content-Length")
        received = 0
        try:
            with part.open(mode) as handle:
                while chunk := response.read(chunk_bytes):
                    handle.write(chunk)
                    received += len(chunk)
        except (http.client.IncompleteRead, TimeoutError, ConnectionError, OSError) as exc:
            raise _TransientError(f"connection lost after {received:,} bytes ({exc})") from None
        if expected is not None and received < int(expected):
            raise _TransientError(
                f"connection closed after {received:,} of {int(expected):,} bytes"
            )


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


# --------------------------------------------------------------------------- extraction


def _extract_atomically(zip_path: Path, target: Path, folder: str, sha256: str) -> None:
    """Unpack into a temporary folder beside ``target``, then rename it into place."""
    staging = Path(tempfile.mkdtemp(prefix=f".{folder}.extract-", dir=target.parent))
    try:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                for member in archive.namelist():
                    resolved = (staging / member).resolve()
                    if not resolved.is_relative_to(staging.resolve()):
                        raise SourceError(f"{zip_path.name}: member {member!r} escapes the folder")
                archive.extractall(staging)
        except zipfile.BadZipFile as exc:
            raise SourceError(f"{zip_path.name}: not a valid zip ({exc})") from None
        # GroupLens zips hold one top folder (ml-100k/); a flat zip is the folder itself.
        root = staging / folder if (staging / folder).is_dir() else staging
        marker = {"archive": zip_path.name.removesuffix(".part"), "sha256": sha256}
        (root / MARKER_FILE).write_text(json.dumps(marker))
        os.replace(root, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _marker_sha256(target: Path) -> str | None:
    try:
        return json.loads((target / MARKER_FILE).read_text()).get("sha256")
    except (OSError, ValueError):
        return None
