"""The reference profile: what "no drift" looks like, saved beside a model at training time.

A bounded, seeded, uniform sample (``monitoring.reference_rows``) of the rows the
model was judged on: its numeric and categorical features (kinds from the
feature spec), its prediction column(s) and the label column(s) the spec names.
Drift checks compare each current window with it.

On storage (local folder or object store, through :class:`infra.storage.StoragePath`)::

    folder/reference.parquet   the sampled rows (zstd)
    folder/reference.json      spec version and names, column kinds, row counts, seed,
                               created_at (UTC); written last, so a folder without it
                               is an unfinished profile and does not load

Not yet here: sketches over the whole data (HLL of users, Count-Min heavy hitters
of items) for the cheap per-window checks; they will be added to this folder and
listed in ``reference.json`` (``"sketches"``).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl

from features.feature_spec import FeatureKind, FeatureSpec
from infra.storage import StoragePath
from monitoring.columns import column_kinds, judged_columns, sample_rows

DATA_FILE = "reference.parquet"
META_FILE = "reference.json"
# 2: ``unjudged`` (features the drift tests leave alone, with the reason).
FORMAT_VERSION = 2


def _folder(folder: StoragePath | str | os.PathLike[str]) -> StoragePath:
    return folder if isinstance(folder, StoragePath) else StoragePath.from_uri(folder)


@dataclass(frozen=True)
class ReferenceProfile:
    """A sampled reference frame and what its columns are.

    ``features`` ``{name: numeric | categorical}`` in spec order, the features
    the drift tests judge; ``unjudged`` ``{name: reason}`` the spec's other
    numeric and categorical features (growing counters, ids, counts whose window
    the log had not filled: :func:`monitoring.columns.judged_columns`); ``predictions``
    the model's score column(s) (numeric); ``labels`` the spec's label columns
    found in the source (may hold nulls: labels arrive late); ``skipped`` spec
    features of other kinds (sequence, embedding) that are not kept;
    ``source_rows`` the rows the sample was drawn from. ``==`` compares the
    metadata only (compare frames with ``frame.equals``).
    """

    frame: pl.DataFrame = field(compare=False)
    features: dict[str, FeatureKind]
    predictions: tuple[str, ...]
    labels: tuple[str, ...]
    skipped: dict[str, FeatureKind]
    unjudged: dict[str, str]
    source_rows: int
    # {column: distance}: the largest leave-one-day-out distance of each judged
    # column and prediction (monitoring.drift.day_noise); {} when not measured.
    noise: dict[str, float]
    seed: int
    spec_version: int
    created_at: str

    @property
    def rows(self) -> int:
        return self.frame.height

    @property
    def columns(self) -> dict[str, FeatureKind]:
        """Features and predictions with their kinds: what :func:`monitoring.drift.data_drift` takes."""
        return {**self.features, **dict.fromkeys(self.predictions, FeatureKind.NUMERIC)}

    # ------------------------------------------------------------------ build

    @classmethod
    def build(
        cls,
        frame: pl.DataFrame,
        spec: FeatureSpec,
        rows: int,
        seed: int,
        predictions: Sequence[str] = ("score",),
        created_at: datetime | None = None,
        *,
        log_age_days: float | None = None,
        window_days: int = 1,
    ) -> ReferenceProfile:
        """Sample ``rows`` rows of ``frame`` (uniform, seeded) and keep the monitored columns.

        Every judged feature of ``spec`` (``log_age_days``: the log's age where
        ``frame`` starts; ``window_days``: the current windows' length; see
        :func:`~monitoring.columns.judged_columns`) and every column of
        ``predictions`` must be in ``frame`` (pass ``predictions=()`` for a
        features-only profile); label columns of the spec are kept where present.
        """
        features, unjudged = judged_columns(spec, log_age_days, window_days)
        predictions = tuple(predictions)
        missing = [c for c in [*features, *predictions] if c not in frame.columns]
        if missing:
            raise ValueError(f"reference frame lacks columns {missing}")
        clash = sorted(set(features) & set(predictions))
        if clash:
            raise ValueError(f"columns {clash} are both features and predictions")
        for name in predictions:
            if not frame.schema[name].is_numeric():
                raise ValueError(
                    f"prediction column {name!r} must be numeric, got {frame.schema[name]}"
                )
        labels = tuple(name for name in spec.labels if name in frame.columns)
        skipped = {
            f.name: f.kind
            for f in spec.features
            if f.name not in features and f.name not in unjudged
        }
        sample = sample_rows(frame.select([*features, *predictions, *labels]), rows, seed)
        stamp = (created_at or datetime.now(UTC)).astimezone(UTC).isoformat()
        return cls(
            frame=sample,
            features=features,
            predictions=predictions,
            labels=labels,
            skipped=skipped,
            unjudged=unjudged,
            source_rows=frame.height,
            noise={},
            seed=seed,
            spec_version=spec.version,
            created_at=stamp,
        )

    # ------------------------------------------------------------------ storage

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "created_at": self.created_at,
            "spec_version": self.spec_version,
            "features": {name: kind.value for name, kind in self.features.items()},
            "predictions": list(self.predictions),
            "labels": list(self.labels),
            "skipped": {name: kind.value for name, kind in self.skipped.items()},
            "unjudged": self.unjudged,
            "noise": self.noise,
            "rows": self.rows,
            "source_rows": self.source_rows,
            "seed": self.seed,
        }

    def save(self, folder: StoragePath | str | os.PathLike[str]) -> StoragePath:
        """Write ``reference.parquet`` then ``reference.json`` (each atomically) into ``folder``."""
        target = _folder(folder)
        buffer = io.BytesIO()
        self.frame.write_parquet(buffer, compression="zstd", statistics=True)
        target.join(DATA_FILE).write_bytes_atomic(buffer.getvalue())
        target.join(META_FILE).write_text_atomic(json.dumps(self.metadata(), indent=2))
        return target

    @classmethod
    def load(cls, folder: StoragePath | str | os.PathLike[str]) -> ReferenceProfile:
        source = _folder(folder)
        meta_path = source.join(META_FILE)
        if not meta_path.exists():
            raise FileNotFoundError(f"no reference profile at {source.uri} ({META_FILE} missing)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"reference profile format {meta.get('format')} is not {FORMAT_VERSION}"
            )
        frame = pl.read_parquet(io.BytesIO(source.join(DATA_FILE).read_bytes()))
        features = column_kinds(meta["features"])
        expected = [*features, *meta["predictions"], *meta["labels"]]
        if frame.columns != expected or frame.height != meta["rows"]:
            raise ValueError(
                f"reference profile at {source.uri} is inconsistent: parquet has "
                f"{frame.columns} x {frame.height} rows, {META_FILE} says {expected} x {meta['rows']}"
            )
        return cls(
            frame=frame,
            features=features,
            predictions=tuple(meta["predictions"]),
            labels=tuple(meta["labels"]),
            skipped={name: FeatureKind(kind) for name, kind in meta["skipped"].items()},
            unjudged=dict(meta["unjudged"]),
            noise={name: float(value) for name, value in meta["noise"].items()},
            source_rows=meta["source_rows"],
            seed=meta["seed"],
            spec_version=meta["spec_version"],
            created_at=meta["created_at"],
        )
