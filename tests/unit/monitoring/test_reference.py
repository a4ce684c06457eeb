"""Reference profile: a bounded seeded sample of the monitored columns, saved and loaded."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.feature_spec import DriftRole, Entity, Feature, FeatureKind, FeatureSpec
from monitoring.columns import judged_columns
from monitoring.reference import DATA_FILE, META_FILE, ReferenceProfile

SPEC = FeatureSpec(
    features=(
        Feature(name="x", kind=FeatureKind.NUMERIC, entity=Entity.EXAMPLE, dtype="float64"),
        Feature(
            name="c",
            kind=FeatureKind.CATEGORICAL,
            entity=Entity.EXAMPLE,
            dtype="string",
            vocabulary=("a", "b"),
        ),
        Feature(
            name="history",
            kind=FeatureKind.SEQUENCE,
            entity=Entity.USER,
            dtype="list[int64]",
            max_length=5,
        ),
    ),
)


def _frame(n: int = 1_000) -> pl.DataFrame:
    """``x`` = row number, so a sample's x values say which rows it holds."""
    return pl.DataFrame(
        {
            "x": np.arange(n, dtype=np.float64),
            "c": ["a", "b"] * (n // 2),
            "history": [[1, 2]] * n,
            "score": np.linspace(0.0, 1.0, n),
            "label": [0, 1] * (n // 2),
            "unrelated": np.zeros(n),
        }
    )


def test_build_keeps_a_seeded_uniform_sample_of_the_monitored_columns() -> None:
    profile = ReferenceProfile.build(_frame(), SPEC, rows=100, seed=7)
    assert profile.rows == 100 and profile.source_rows == 1_000
    # Numeric + categorical features, then predictions, then labels; sequence skipped.
    assert profile.frame.columns == ["x", "c", "score", "label"]
    assert profile.features == {"x": FeatureKind.NUMERIC, "c": FeatureKind.CATEGORICAL}
    assert profile.skipped == {"history": FeatureKind.SEQUENCE}
    assert profile.columns == {"x": "numeric", "c": "categorical", "score": "numeric"}
    rows = profile.frame["x"].to_numpy()
    assert np.all(np.diff(rows) > 0)  # distinct rows, in the source's order
    assert rows.min() < 100 and rows.max() > 900  # spread over the whole frame
    same = ReferenceProfile.build(_frame(), SPEC, rows=100, seed=7)
    other = ReferenceProfile.build(_frame(), SPEC, rows=100, seed=8)
    assert same.frame.equals(profile.frame)
    assert not other.frame.equals(profile.frame)


def test_build_keeps_every_row_of_a_small_frame() -> None:
    profile = ReferenceProfile.build(_frame(50), SPEC, rows=100, seed=0)
    assert profile.rows == 50


def test_build_names_missing_columns() -> None:
    with pytest.raises(ValueError, match=r"\['c'\]"):
        ReferenceProfile.build(_frame().drop("c"), SPEC, rows=10, seed=0)
    with pytest.raises(ValueError, match="score"):
        ReferenceProfile.build(_frame().drop("score"), SPEC, rows=10, seed=0)
    # A features-only profile needs no score; a frame without labels keeps none.
    profile = ReferenceProfile.build(
        _frame().drop("score", "label"), SPEC, rows=10, seed=0, predictions=()
    )
    assert profile.frame.columns == ["x", "c"] and profile.labels == ()


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    created = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    profile = ReferenceProfile.build(_frame(), SPEC, rows=100, seed=3, created_at=created)
    profile = replace(profile, noise={"x": 0.05})
    folder = profile.save(tmp_path / "reference")
    meta = json.loads((tmp_path / "reference" / META_FILE).read_text())
    assert meta == {
        "format": 2,
        "created_at": "2024-03-01T12:00:00+00:00",
        "spec_version": 1,
        "features": {"x": "numeric", "c": "categorical"},
        "predictions": ["score"],
        "labels": ["label"],
        "skipped": {"history": "sequence"},
        "unjudged": {},
        "noise": {"x": 0.05},
        "rows": 100,
        "source_rows": 1000,
        "seed": 3,
    }
    loaded = ReferenceProfile.load(folder)
    assert loaded.frame.equals(profile.frame)
    assert loaded == profile  # every other field


def test_load_refuses_unfinished_or_inconsistent_profiles(tmp_path: Path) -> None:
    profile = ReferenceProfile.build(_frame(), SPEC, rows=100, seed=3)
    profile.save(tmp_path)
    (tmp_path / META_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=META_FILE):
        ReferenceProfile.load(tmp_path)
    profile.save(tmp_path)
    pl.DataFrame({"x": [1.0]}).write_parquet(tmp_path / DATA_FILE)
    with pytest.raises(ValueError, match="inconsistent"):
        ReferenceProfile.load(tmp_path)


def test_features_that_move_with_time_are_kept_out_with_their_reason() -> None:
    spec = FeatureSpec(
        features=(
            Feature(name="x", kind=FeatureKind.NUMERIC, entity=Entity.USER, dtype="float64"),
            Feature(
                name="user_id", kind=FeatureKind.CATEGORICAL, entity=Entity.USER,
                dtype="int64", hash_buckets=10, drift=DriftRole.IDENTIFIER,
            ),
            Feature(
                name="clicks_total", kind=FeatureKind.NUMERIC, entity=Entity.USER,
                dtype="float64", drift=DriftRole.GROWING,
            ),
            Feature(
                name="clicks_7d", kind=FeatureKind.NUMERIC, entity=Entity.USER,
                dtype="float64", warmup_days=7,
            ),
            Feature(
                name="weekday", kind=FeatureKind.CATEGORICAL, entity=Entity.CONTEXT,
                dtype="int64", vocabulary=tuple("0123456"), drift=DriftRole.CALENDAR,
            ),
        ),
    )  # fmt: skip
    judged, unjudged = judged_columns(spec, log_age_days=3.0, window_days=1)
    assert list(judged) == ["x"]
    assert set(unjudged) == {"user_id", "clicks_total", "clicks_7d", "weekday"}
    assert "3.0 days old" in unjudged["clicks_7d"]
    # An older log fills the 7-day window; a week-long window holds every weekday.
    judged, unjudged = judged_columns(spec, log_age_days=7.0, window_days=7)
    assert list(judged) == ["x", "clicks_7d", "weekday"]
    # A table without time: windows are taken as filled.
    assert "clicks_7d" in judged_columns(spec, log_age_days=None, window_days=1)[0]
    frame = pl.DataFrame(
        {"x": [1.0, 2.0], "user_id": [1, 2], "clicks_total": [3.0, 4.0],
         "clicks_7d": [1.0, 0.0], "weekday": [0, 1], "score": [0.1, 0.2]}
    )  # fmt: skip
    profile = ReferenceProfile.build(frame, spec, rows=10, seed=0, log_age_days=3.0)
    assert list(profile.features) == ["x"] and profile.frame.columns == ["x", "score"]
    assert "user_id" in profile.unjudged and "user_id" not in profile.skipped
