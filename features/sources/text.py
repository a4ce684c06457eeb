"""Reading raw text files as strings: encodings, separators, ragged lines.

Sources hand raw values to validation, so every field is read as a string and
nothing is parsed here. Two readers cover the public datasets:

- :func:`read_fields` splits each line on a separator of any length (``::`` in
  MovieLens 1M/10M, ``|`` in ML-100K, a tab in RecBole). A line with the wrong
  number of fields keeps its row with every field null, so validation
  quarantines it instead of the reader silently shifting columns.
- :func:`read_csv_strings` reads a real CSV (quoted fields, a header row).

Old GroupLens files are latin-1 (``Misérables``), newer ones UTF-8: a file is
decoded as UTF-8 when it is valid UTF-8 and as latin-1 otherwise (every byte
string is valid latin-1, so this never fails, and valid UTF-8 is almost never
accidental).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from infra.errors import SourceError

# A byte that does not occur in text files: polars reads each whole line as one field.
_NO_SEPARATOR = "\x1f"


def local_path(path: str | Path) -> Path:
    """``path`` as a local :class:`Path`; object-store URIs are not read by sources yet."""
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        raise SourceError(f"{text}: sources read local files only; download or copy the data first")
    resolved = Path(text.removeprefix("file://")).expanduser()
    if not resolved.exists():
        raise SourceError(f"{resolved}: no such file or folder")
    return resolved


def utf8_bytes(path: Path) -> bytes:
    """The file's bytes as UTF-8, decoding latin-1 files first."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1").encode("utf-8")
    return data


def read_lines(path: Path) -> pl.Series:
    """Non-empty lines of ``path`` (trailing ``\\r`` removed) as a String series."""
    data = utf8_bytes(path)
    if not data.strip():
        return pl.Series("line", [], dtype=pl.String)
    frame = pl.read_csv(
        data,
        has_header=False,
        separator=_NO_SEPARATOR,
        quote_char=None,
        new_columns=["line"],
        schema={"line": pl.String},
    )
    lines = frame.get_column("line").str.strip_chars_end("\r")
    return lines.filter(lines.is_not_null() & (lines != ""))


def read_fields(path: Path, separator: str, names: list[str]) -> pl.DataFrame:
    """Split each line of ``path`` on ``separator`` into string columns ``names``.

    Lines with a different number of fields get nulls in every column.
    """
    parts = read_lines(path).str.split(separator)
    ok = parts.list.len() == len(names)
    return pl.DataFrame(
        {
            name: pl.select(
                pl.when(pl.lit(ok)).then(parts.list.get(i, null_on_oob=True)).otherwise(None)
            ).to_series()
            for i, name in enumerate(names)
        }
    )


def read_csv_strings(path: Path, separator: str = ",", has_header: bool = True) -> pl.DataFrame:
    """A CSV file with every column as a string (empty fields are null)."""
    try:
        return pl.read_csv(
            utf8_bytes(path), separator=separator, has_header=has_header, infer_schema=False
        )
    except pl.exceptions.PolarsError as exc:
        raise SourceError(f"{path}: cannot read as CSV ({type(exc).__name__}: {exc})") from None


def require_columns(frame: pl.DataFrame, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SourceError(f"{path}: missing column(s) {', '.join(missing)}; found {frame.columns}")
