"""The numpy candidate encoder equals the reference (online frame + encode_examples) on a real run."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator

import numpy as np
import polars as pl
import pytest
import torch

from features.feature_spec import Entity, Feature, FeatureKind, FeatureSpec, Normalization
from features.online_frame import online_frame
from features.online_store import FeatureRead
from infra.config import RayrecConfig
from pipelines.runner import published
from pipelines.serving_sources import published_sources
from serving.candidate_features import CandidateEncoder, UnsupportedFeature
from serving.encoding import (
    RETRIEVAL_SCORE,
    SCORING_POSITION,
    RankerPart,
    SpecColumns,
    encode_examples,
)
from serving.recommender import Recommender

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


def _as_of(config: RayrecConfig) -> dt.datetime:
    """When the online store's vectors were computed (the features build's as_of)."""
    features = published(config, "features").path  # type: ignore[union-attr]
    return dt.datetime.fromisoformat(json.loads(features.join("prior.json").read_text())["as_of"])


@pytest.fixture(scope="module")
def recommender(tiny_default_style_run: RayrecConfig) -> Iterator[Recommender]:
    """The session's tiny run (tests/conftest.py) served with the clock at the store's as_of."""
    config = tiny_default_style_run
    as_of = _as_of(config)
    threads = torch.get_num_threads()
    loaded = Recommender.load(
        published_sources(config),
        config.serving,
        config.features,
        config.paths.workdir,
        clock=lambda: as_of,
    )
    yield loaded
    loaded.close()
    torch.set_num_threads(threads)


def _assert_same(fast: RankerPart, reference: RankerPart) -> None:
    assert torch.equal(fast.categorical, reference.categorical)
    assert fast.numeric.dtype == reference.numeric.dtype == torch.float32
    assert fast.numeric.shape == reference.numeric.shape
    np.testing.assert_allclose(fast.numeric.numpy(), reference.numeric.numpy(), rtol=0, atol=1e-6)
    assert len(fast.sequences) == len(reference.sequences) == 1
    for ours, theirs in zip(fast.sequences, reference.sequences, strict=True):
        assert torch.equal(ours, theirs)
    assert fast.users is not None and reference.users is not None
    assert torch.equal(fast.users, reference.users)
    assert torch.equal(fast.labels, reference.labels)
    assert fast.targets == reference.targets == {}


def _users(recommender: Recommender) -> dict[str, list[int]]:
    """User ids by kind: with stored history, stored without history, in the users table but
    not in the store, in neither."""
    table = recommender.bundle.users.get_column("user_id").to_list()
    reads = [recommender.store.read_user(u) for u in table]
    return {
        "history": [r.entity_id for r in reads if r.found and r.history][:25],
        "no history": [r.entity_id for r in reads if r.found and not r.history][:5],
        "not stored": [r.entity_id for r in reads if not r.found][:5],
        "unknown": [max(table) + 1, 10**9, -1],
    }


def _candidate_lists(recommender: Recommender, rng: np.random.Generator) -> list[np.ndarray]:
    """Catalogue subsets of several sizes, some with ids absent from the store and the items
    table, a repeated id, a single candidate."""
    ids = recommender.catalogue.ids
    absent = np.array([int(ids.max()) + 1, 10**9, -3], dtype=np.int64)
    lists = [rng.choice(ids, size=n, replace=False) for n in (1, 17, 100, min(200, ids.size))]
    lists.append(np.concatenate([rng.choice(ids, size=30, replace=False), absent]))
    lists.append(np.concatenate([absent[:1], ids[:5], ids[:2]]))
    return lists


def test_the_fast_path_encodes_as_the_online_frame_does(
    tiny_default_style_run: RayrecConfig, recommender: Recommender
) -> None:
    bundle = recommender.bundle
    encoder = CandidateEncoder.build(bundle, recommender.features.windows_days)
    as_of = _as_of(tiny_default_style_run)
    rng = np.random.default_rng(0)
    users = _users(recommender)
    assert all(users.values()), {kind: len(ids) for kind, ids in users.items()}
    lists = _candidate_lists(recommender, rng)
    reads_found = recommender.store.read_items(recommender.catalogue.ids.tolist())["found"]
    assert not reads_found.all(), "some catalogue item should be missing from the store"
    compared = 0
    # At the store's as_of, and days later (other hour and weekday, older stored vectors).
    for ts in (as_of, as_of + dt.timedelta(days=3, hours=5, seconds=7)):
        for ids_of_kind in users.values():
            for user_id in ids_of_kind:
                user = recommender.store.read_user(user_id)
                for ids in lists:
                    scores = rng.normal(size=ids.size).astype(np.float32)
                    reads = recommender.store.read_items(ids.tolist())
                    frame = recommender.candidate_frame(user_id, user, ids, scores, ts, reads)
                    reference = encode_examples(frame, bundle.spec, bundle.columns, labelled=False)
                    _assert_same(encoder.encode(user_id, user, ids, scores, reads, ts), reference)
                    compared += 1
    assert compared == 2 * sum(map(len, users.values())) * len(lists)


def _reference(
    recommender: Recommender,
    users: pl.DataFrame,
    items: pl.DataFrame,
    user_id: int,
    user: FeatureRead,
    ids: np.ndarray,
    scores: np.ndarray,
    ts: dt.datetime,
) -> RankerPart:
    """What the recommender's candidate_frame + encode_examples give over other tables."""
    bundle = recommender.bundle
    frame = online_frame(
        user_id,
        user,
        ids,
        recommender.store.read_items(ids.tolist()),
        ts,
        users,
        items,
        recommender.features.windows_days,
        position=SCORING_POSITION,
    ).with_columns(pl.Series(RETRIEVAL_SCORE, scores, dtype=pl.Float64))
    return encode_examples(frame, bundle.spec, bundle.columns, labelled=False)


def test_item_age_without_first_seen_and_tables_missing_rows(
    tiny_default_style_run: RayrecConfig, recommender: Recommender
) -> None:
    """Items without ``first_seen`` (age from the stored seconds since first), attribute
    tables with a null key, null attributes and a shuffled order: still the reference."""
    bundle = recommender.bundle
    items = (
        bundle.items.drop("first_seen")
        .with_columns(
            pl.when(pl.col("item_id") % 7 == 0)
            .then(None)
            .otherwise(pl.col("category"))
            .alias("category"),
            pl.when(pl.col("item_id") % 5 == 0)
            .then(None)
            .otherwise(pl.col("price"))
            .alias("price"),
        )
        .filter(pl.col("item_id") % 11 != 3)
        .sample(fraction=1.0, shuffle=True, seed=1)
    )
    users = pl.concat(
        [
            bundle.users.filter(pl.col("user_id") % 4 != 1),
            bundle.users.head(1).with_columns(pl.lit(None, pl.Int64).alias("user_id")),
        ]
    )
    encoder = CandidateEncoder(
        bundle.spec, bundle.columns, users, items, recommender.features.windows_days
    )
    as_of = _as_of(tiny_default_style_run)
    rng = np.random.default_rng(1)
    lists = _candidate_lists(recommender, rng)
    found = [u for u in range(bundle.users.height) if recommender.store.read_user(u).history]
    for ts in (as_of, as_of + dt.timedelta(days=2, minutes=3)):
        for user_id in [*found[:12], 10**9]:
            user = recommender.store.read_user(user_id)
            for ids in lists:
                scores = rng.normal(size=ids.size).astype(np.float32)
                reads = recommender.store.read_items(ids.tolist())
                expected = _reference(recommender, users, items, user_id, user, ids, scores, ts)
                _assert_same(encoder.encode(user_id, user, ids, scores, reads, ts), expected)


def test_a_feature_the_fast_path_cannot_make_is_named_at_build(recommender: Recommender) -> None:
    bundle = recommender.bundle
    windows = recommender.features.windows_days
    extra = Feature(
        name="item_events_14d",
        kind=FeatureKind.NUMERIC,
        entity=Entity.ITEM,
        dtype="float64",
        normalization=Normalization.LOG1P,
    )
    spec = FeatureSpec(labels=bundle.spec.labels, features=(*bundle.spec.features, extra))
    columns = SpecColumns.of(spec, columns=spec.names)
    with pytest.raises(UnsupportedFeature, match="item_events_14d"):
        CandidateEncoder(spec, columns, bundle.users, bundle.items, windows)
    # Without the items' categories there is no item_category (the first named) nor
    # category_affinity.
    with pytest.raises(UnsupportedFeature, match="item_category"):
        CandidateEncoder(
            bundle.spec, bundle.columns, bundle.users, bundle.items.drop("category"), windows
        )
    # A categorical that only the stored counters could give is not guessed either.
    counted = Feature(
        name="user_clicks_total",
        kind=FeatureKind.CATEGORICAL,
        entity=Entity.USER,
        dtype="int64",
        vocabulary=("0", "1"),
    )
    features = tuple(counted if f.name == counted.name else f for f in bundle.spec.features)
    spec = FeatureSpec(labels=bundle.spec.labels, features=features)
    with pytest.raises(UnsupportedFeature, match="user_clicks_total"):
        CandidateEncoder(
            spec, SpecColumns.of(spec, spec.names), bundle.users, bundle.items, windows
        )
    # A repeated id in an attribute table would repeat the join's rows.
    with pytest.raises(UnsupportedFeature, match="repeats ids"):
        CandidateEncoder(
            bundle.spec,
            bundle.columns,
            pl.concat([bundle.users, bundle.users.head(1)]),
            bundle.items,
            windows,
        )
