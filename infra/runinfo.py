"""What code produced an output: package version, git commit, source hashes."""

from __future__ import annotations

import hashlib
import subprocess
from functools import cache
from importlib import metadata, util
from pathlib import Path


@cache
def code_version() -> str:
    """``<package version>+g<commit>[.dirty]`` when run from a git checkout."""
    try:
        version = metadata.version("rayrec")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}{'.dirty' if dirty else ''}"


@cache
def source_hash(*modules: str) -> str:
    """sha256 over the source files of the named modules or packages (recursively).

    Step fingerprints include it, so editing the code that makes an output
    invalidates that output, while unrelated edits do not.
    """
    digest = hashlib.sha256()
    for name in sorted(modules):
        spec = util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(name)
        origin = Path(spec.origin)
        files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
        for file in files:
            digest.update(str(file.relative_to(origin.parent.parent)).encode() + b"\0")
            digest.update(file.read_bytes())
    return digest.hexdigest()
