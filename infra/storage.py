"""Paths that work the same for local folders and object-store URIs.

Everything the platform writes goes through :class:`StoragePath`, a thin pair of
a ``pyarrow.fs.FileSystem`` and a path on it, so ``s3://bucket/run`` and
``./workdir`` take the same code. Object stores have no atomic rename; atomic
publishing is built on a pointer file instead (see :mod:`infra.publish`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


@dataclass(frozen=True)
class StoragePath:
    """A location on some filesystem: ``fs`` + a path in that filesystem's own syntax."""

    fs: pafs.FileSystem
    path: str

    @classmethod
    def from_uri(cls, uri: str | os.PathLike[str]) -> StoragePath:
        """``/abs``, ``rel/dir``, ``file:///x``, ``s3://b/k``, ``gs://b/k`` all work."""
        text = os.fspath(uri)
        if "://" not in text:
            return cls(pafs.LocalFileSystem(), str(Path(text).expanduser().resolve()))
        fs, path = pafs.FileSystem.from_uri(text)
        return cls(fs, path)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def uri(self) -> str:
        if self.is_local:
            return self.path
        return f"{self.fs.type_name}://{self.path}"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def local_path(self) -> Path:
        """The path on this machine; only for local storage."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on the local filesystem")
        return Path(self.path)

    def join(self, *parts: str) -> StoragePath:
        path = self.path.rstrip("/")
        for part in parts:
            path = f"{path}/{part.strip('/')}"
        return StoragePath(self.fs, path)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def makedirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes_atomic(self, data: bytes) -> None:
        """Write so that readers see the old content or the new, never a part.

        Local: a temporary file in the same folder, fsync, ``os.replace``.
        Object stores: a single PUT is already all-or-nothing.
        """
        if self.is_local:
            target = self.local_path()
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        else:
            with self.fs.open_output_stream(self.path) as stream:
                stream.write(data)

    def write_text_atomic(self, text: str) -> None:
        self.write_bytes_atomic(text.encode())

    def delete_dir(self) -> None:
        if self.exists():
            self.fs.delete_dir(self.path)

    def list_dir(self) -> list[StoragePath]:
        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return sorted((StoragePath(self.fs, info.path) for info in infos), key=lambda p: p.path)

    def files(self) -> list[StoragePath]:
        """Every file below this folder, sorted by path."""
        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        files = (StoragePath(self.fs, i.path) for i in infos if i.type == pafs.FileType.File)
        return sorted(files, key=lambda p: p.path)

    def move(self, target: StoragePath) -> None:
        """Rename; atomic on local filesystems, copy-then-delete on object stores."""
        self.fs.move(self.path, target.path)

    def content_hash(self) -> str:
        """sha256 over relative names and bytes of every file below; stable across runs."""
        digest = hashlib.sha256()
        prefix = self.path.rstrip("/") + "/"
        for file in self.files():
            digest.update(file.path.removeprefix(prefix).encode() + b"\0")
            with self.fs.open_input_stream(file.path) as stream:
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()
