"""Atomic publishing by pointer flip, for local folders and object stores alike.

A published location is a folder holding immutable versions and one pointer::

    <root>/CURRENT            JSON: {"version": "v-…", "manifest": {...}}
    <root>/v-20260101T…-ab12/  the files of one version
    <root>/.staging-…/         work in progress (never read)

Writers fill a staging folder, then publish: the folder is renamed to its
version name (local) and the pointer is replaced in one atomic write. Readers go
through the pointer, so a crash at any moment leaves the previous good output
in place and nothing partial visible.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from infra.storage import StoragePath

POINTER = "CURRENT"


@dataclass(frozen=True)
class Published:
    """One published version: where its files are and what its manifest says."""

    version: str
    path: StoragePath
    manifest: dict[str, Any]


class VersionedOutput:
    """A location published atomically; ``keep`` versions are retained."""

    def __init__(self, root: StoragePath, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.root = root
        self.keep = keep

    @property
    def pointer(self) -> StoragePath:
        return self.root.join(POINTER)

    def current(self) -> Published | None:
        """The published version, or None when nothing was ever published."""
        if not self.pointer.exists():
            return None
        record = json.loads(self.pointer.read_text())
        return Published(record["version"], self.root.join(record["version"]), record["manifest"])

    @contextmanager
    def writing(self) -> Iterator[StoragePath]:
        """Yield a fresh staging folder; it is deleted if the block raises.

        Publishing is a separate, explicit call (:meth:`publish`) so the caller
        decides what goes into the manifest after the files are written.
        """
        staging = self.root.join(f".staging-{uuid.uuid4().hex[:12]}")
        staging.makedirs()
        try:
            yield staging
        except BaseException:
            staging.delete_dir()
            raise

    def publish(self, staging: StoragePath, manifest: dict[str, Any]) -> Published:
        """Make ``staging`` the current version; returns what was published."""
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        version = f"v-{stamp}-{uuid.uuid4().hex[:6]}"
        target = self.root.join(version)
        # Object stores have no atomic rename, but a version folder is invisible
        # until the pointer names it, so copy-then-delete is safe here too.
        staging.move(target)
        full_manifest = {
            **manifest,
            "content_hash": target.content_hash(),
            "published_at": dt.datetime.now(dt.UTC).isoformat(),
        }
        record = {"version": version, "manifest": full_manifest}
        self.pointer.write_text_atomic(json.dumps(record, indent=2, sort_keys=True, default=str))
        self._collect_garbage(keep_version=version)
        return Published(version, target, full_manifest)

    def _collect_garbage(self, keep_version: str) -> None:
        versions = [p for p in self.root.list_dir() if p.name.startswith("v-")]
        # Names sort by their timestamp; the newest `keep` stay.
        stale = [p for p in versions if p.name != keep_version][: max(0, len(versions) - self.keep)]
        for path in stale:
            path.delete_dir()
        for path in self.root.list_dir():
            if path.name.startswith(".staging-") and _older_than(path, hours=24):
                path.delete_dir()


def _older_than(path: StoragePath, hours: float) -> bool:
    info = path.fs.get_file_info(path.path)
    if info.mtime is None:
        return False
    age = dt.datetime.now(dt.UTC) - info.mtime.replace(tzinfo=dt.UTC)
    return age > dt.timedelta(hours=hours)
