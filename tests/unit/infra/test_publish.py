"""Atomic publish: a crash at any point leaves the previous version current."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from infra.publish import VersionedOutput
from infra.storage import StoragePath


def _publish(output: VersionedOutput, text: str) -> None:
    with output.writing() as staging:
        staging.join("part-0.txt").write_text_atomic(text)
        staging.join("sub", "part-1.txt").write_text_atomic(text.upper())
        output.publish(staging, {"text": text})


def test_publish_then_read_through_the_pointer(tmp_path: Path) -> None:
    output = VersionedOutput(StoragePath.from_uri(tmp_path / "out"))
    assert output.current() is None
    _publish(output, "one")
    current = output.current()
    assert current is not None
    assert current.path.join("part-0.txt").read_text() == "one"
    assert current.manifest["text"] == "one"
    assert len(current.manifest["content_hash"]) == 64


def test_exception_mid_write_keeps_the_old_version_and_leaves_no_staging(tmp_path: Path) -> None:
    output = VersionedOutput(StoragePath.from_uri(tmp_path / "out"))
    _publish(output, "good")
    before = output.current()
    with pytest.raises(RuntimeError, match="disk on fire"), output.writing() as staging:
        staging.join("part-0.txt").write_text_atomic("half")
        raise RuntimeError("disk on fire")
    after = output.current()
    assert after == before
    assert after is not None and after.path.join("part-0.txt").read_text() == "good"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".staging")]


def test_killed_process_mid_write_keeps_the_old_version(tmp_path: Path) -> None:
    """A hard kill (no cleanup runs) between writing and publishing."""
    root = tmp_path / "out"
    output = VersionedOutput(StoragePath.from_uri(root))
    _publish(output, "good")
    script = textwrap.dedent(
        f"""
        import os
        from infra.publish import VersionedOutput
        from infra.storage import StoragePath
        output = VersionedOutput(StoragePath.from_uri({str(root)!r}))
        with output.writing() as staging:
            staging.join("part-0.txt").write_text_atomic("partial")
            os._exit(9)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[3])
    assert result.returncode == 9
    current = output.current()
    assert current is not None and current.path.join("part-0.txt").read_text() == "good"
    # The orphaned staging folder exists but nothing points at it.
    assert any(p.name.startswith(".staging") for p in root.iterdir())


def test_old_versions_beyond_keep_are_deleted(tmp_path: Path) -> None:
    output = VersionedOutput(StoragePath.from_uri(tmp_path / "out"), keep=2)
    for text in ("a", "b", "c", "d"):
        _publish(output, text)
    versions = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("v-"))
    assert len(versions) == 2
    current = output.current()
    assert current is not None and current.version == versions[-1]
    assert current.path.join("part-0.txt").read_text() == "d"


def test_content_hash_depends_on_names_and_bytes_only(tmp_path: Path) -> None:
    first = VersionedOutput(StoragePath.from_uri(tmp_path / "one"))
    second = VersionedOutput(StoragePath.from_uri(tmp_path / "two"))
    _publish(first, "same")
    _publish(second, "same")
    a, b = first.current(), second.current()
    assert a is not None and b is not None
    assert a.manifest["content_hash"] == b.manifest["content_hash"]
    _publish(second, "different")
    c = second.current()
    assert c is not None and c.manifest["content_hash"] != a.manifest["content_hash"]


def test_storage_path_understands_uris(tmp_path: Path) -> None:
    local = StoragePath.from_uri(tmp_path)
    assert local.is_local and local.join("a", "b").path == f"{tmp_path}/a/b"
    assert StoragePath.from_uri(tmp_path.as_uri()).is_local


def test_publish_works_on_a_filesystem_without_atomic_rename() -> None:
    """The object-store path: an fsspec in-memory filesystem through pyarrow.

    No rename, no temp files: the version folder is copied and the pointer is
    one PUT, exactly the code path s3:// and gs:// take.
    """
    import pyarrow.fs as pafs
    from fsspec.implementations.memory import MemoryFileSystem

    fs = pafs.PyFileSystem(pafs.FSSpecHandler(MemoryFileSystem()))
    root = StoragePath(fs, "/bucket/out")
    assert not root.is_local
    output = VersionedOutput(root)
    _publish(output, "first")
    with pytest.raises(RuntimeError), output.writing() as staging:
        staging.join("part-0.txt").write_text_atomic("partial")
        raise RuntimeError("network reset")
    _publish(output, "second")
    current = output.current()
    assert current is not None
    assert current.path.join("part-0.txt").read_text() == "second"
    assert current.path.join("sub", "part-1.txt").read_text() == "SECOND"
    assert [p.name for p in root.list_dir() if p.name.startswith(".staging")] == []
