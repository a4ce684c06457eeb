"""The downloader against a real HTTP server on 127.0.0.1 with Range support."""

from __future__ import annotations

import hashlib
import io
import re
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from features.sources.download import MARKER_FILE, REGISTRY, download_dataset
from features.sources.movielens import read_movielens
from infra.errors import SourceError


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    # Bytes sent before the connection is dropped, for the next this-many GETs.
    drop_after: int | None = None
    drops_left: int = 0
    ignore_range: bool = False
    ranges: list[str | None] = field(default_factory=list)


def _handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = state.files.get(self.path.rsplit("/", 1)[-1])
            state.ranges.append(self.headers.get("Range"))
            if body is None:
                self.send_error(404)
                return
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match and not state.ignore_range:
                start = int(match.group(1))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if state.drops_left and state.drop_after is not None:
                state.drops_left -= 1
                self.wfile.write(payload[: state.drop_after])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture()
def server() -> Iterator[tuple[str, ServerState]]:
    state = ServerState()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/datasets/movielens", state
    finally:
        httpd.shutdown()
        httpd.server_close()


def _ml100k_zip() -> bytes:
    """A tiny archive in the real ml-100k.zip layout (top folder ml-100k/)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        # Stored, not deflated, and padded: big enough to be cut in the middle.
        archive.writestr("ml-100k/u.data", "1\t1\t5\t881250949\n2\t1\t3\t881250950\n" * 2_000)
        archive.writestr("ml-100k/u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
        archive.writestr("ml-100k/u.genre", "unknown|0\nAction|1\n\n")
        archive.writestr(
            "ml-100k/u.item", "1|Toy Story (1995)|01-Jan-1995||http://x|0|1\n".encode("latin-1")
        )
    return buffer.getvalue()


def test_full_download_verify_extract_then_reuse(server, tmp_path: Path) -> None:
    base_url, state = server
    data = _ml100k_zip()
    state.files["ml-100k.zip"] = data
    sha = hashlib.sha256(data).hexdigest()
    folder = download_dataset(
        "movielens-100k", tmp_path, base_url, expected_sha256=sha, backoff_s=0
    )
    assert folder == tmp_path / "ml-100k"
    assert (folder / MARKER_FILE).is_file()
    assert read_movielens(folder).events.height == 4_000
    # Nothing half-done is left beside it: no .part, no staging folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml-100k"]
    # A second call finds the verified folder and makes no request.
    requests = len(state.ranges)
    assert download_dataset("movielens-100k", tmp_path, base_url, expected_sha256=sha) == folder
    assert len(state.ranges) == requests


def test_resume_after_dropped_connection(server, tmp_path: Path) -> None:
    base_url, state = server
    data = _ml100k_zip()
    state.files["ml-100k.zip"] = data
    half = len(data) // 2
    state.drop_after, state.drops_left = half, 1
    sha = hashlib.sha256(data).hexdigest()
    folder = download_dataset(
        "movielens-100k", tmp_path, base_url, expected_sha256=sha, backoff_s=0
    )
    assert (folder / "u.data").is_file()
    # First request from 0, the retry continues where the drop left the .part file.
    assert state.ranges == [None, f"bytes={half}-"]


def test_resume_from_previous_call_and_server_ignoring_range(server, tmp_path: Path) -> None:
    base_url, state = server
    data = _ml100k_zip()
    state.files["ml-100k.zip"] = data
    sha = hashlib.sha256(data).hexdigest()
    state.drop_after, state.drops_left = 1_000, 5
    with pytest.raises(SourceError, match="download failed after 2 attempts.*next call resumes"):
        download_dataset(
            "movielens-100k", tmp_path, base_url, expected_sha256=sha, max_attempts=2, backoff_s=0
        )
    part = tmp_path / "ml-100k.zip.part"
    assert part.stat().st_size == 2_000
    # The server now ignores Range (200 + whole body): the part is rewritten, not appended to.
    state.drops_left, state.ignore_range = 0, True
    state.ranges.clear()
    download_dataset("movielens-100k", tmp_path, base_url, expected_sha256=sha, backoff_s=0)
    assert state.ranges == ["bytes=2000-"]
    assert not part.exists()


def test_checksum_mismatch_uses_registry_hash_and_deletes_the_file(server, tmp_path: Path) -> None:
    base_url, state = server
    data = _ml100k_zip()
    state.files["ml-100k.zip"] = data
    pinned = REGISTRY["movielens-100k"].sha256
    actual = hashlib.sha256(data).hexdigest()
    # Without expected_sha256 the registry's pin is what the archive must match.
    with pytest.raises(SourceError) as info:
        download_dataset("movielens-100k", tmp_path, base_url, backoff_s=0)
    message = str(info.value)
    assert "ml-100k.zip" in message and pinned in message and actual in message
    assert list(tmp_path.iterdir()) == []  # no .part, no extracted folder


def test_registry_and_errors(tmp_path: Path) -> None:
    assert set(REGISTRY) == {"movielens-100k", "movielens-1m", "movielens-25m", "ml-latest-small"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", a.sha256) for a in REGISTRY.values())
    with pytest.raises(SourceError, match="unknown dataset 'movielens-7m'"):
        download_dataset("movielens-7m", tmp_path)
    (tmp_path / "ml-1m").mkdir()
    with pytest.raises(SourceError, match="not a verified download"):
        download_dataset("movielens-1m", tmp_path, "http://127.0.0.1:9")
