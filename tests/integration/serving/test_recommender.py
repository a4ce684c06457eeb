"""The request path in process on the tiny preset: retrieval → filters → rerank, fallbacks, bounds."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from features.aggregates import CtrPrior
from features.dataset import read_events, read_table
from features.online_frame import online_frame
from features.online_store.sketch_state import popularity_column
from features.training_frame import build_training_frame
from infra.config import DiversityConfig, RayrecConfig, ServingConfig, load_config
from models.artifacts import load_item_encoding, load_two_tower
from models.index import ExactIndex
from pipelines.retrieval.cold_start import catalogue_vectors
from pipelines.runner import published
from pipelines.serving_sources import NotServable, published_sources
from serving.bundle import BundleError, ModelBundle
from serving.encoding import RETRIEVAL_SCORE, SCORING_POSITION, encode_examples
from serving.recommender import Recommender, RequestError
from serving.schemas import Filters, RecommendationRequest

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]

K = 10


@pytest.fixture(scope="module")
def tiny_run(tiny_default_style_run: RayrecConfig) -> RayrecConfig:
    """The session's tiny pipeline (tests/conftest.py), as the default preset sets it up:
    retrieval split by time, its score a reranker input; models, index, online store."""
    return tiny_default_style_run


def _as_of(config: RayrecConfig) -> dt.datetime:
    """When the online store's vectors were computed (the features build's as_of)."""
    features = published(config, "features").path  # type: ignore[union-attr]
    return dt.datetime.fromisoformat(json.loads(features.join("prior.json").read_text())["as_of"])


def _recommender(config: RayrecConfig, serving: ServingConfig | None = None) -> Recommender:
    """A recommender whose clock stands at the store's as_of (the features' last moment)."""
    as_of = _as_of(config)
    return Recommender.load(
        published_sources(config),
        serving or config.serving,
        config.features,
        config.paths.workdir,
        clock=lambda: as_of,
    )


@pytest.fixture(scope="module", autouse=True)
def _torch_threads() -> Iterator[None]:
    """Recommender.load sets the process's torch threads: give the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def recommender(tiny_run: RayrecConfig) -> Iterator[Recommender]:
    loaded = _recommender(tiny_run)
    yield loaded
    loaded.close()


def _known_users(recommender: Recommender, n: int) -> list[int]:
    """Users the store and the two-tower both know, with recent positives, the busiest first."""
    reads = [recommender.store.read_user(u) for u in range(recommender._n_users)]
    known = [r for r in reads if r.found and len(r.history) >= 2]
    known.sort(key=lambda r: (-len(r.history), r.entity_id))
    return [r.entity_id for r in known[:n]]


def test_a_known_user_gets_k_distinct_reranked_items_minus_seen_and_excluded(
    recommender: Recommender,
) -> None:
    user = _known_users(recommender, 1)[0]
    first = recommender.recommend(RecommendationRequest(user_id=user, k=K))
    excluded = tuple(item.item_id for item in first.items[:3])
    response = recommender.recommend(
        RecommendationRequest(user_id=user, k=K, exclude_item_ids=excluded)
    )
    ids = [item.item_id for item in response.items]
    assert len(ids) == K and len(set(ids)) == K
    assert not set(ids) & set(excluded)
    seen = set(recommender.store.read_user(user).history)
    assert seen and not set(ids) & seen
    assert set(ids) <= set(recommender.catalogue.ids.tolist())
    assert (response.fallback, response.reranked, response.degraded) == (False, True, False)
    scores = [item.score for item in response.items]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert set(response.model_versions) == {"two_tower", "index", "reranker"}
    assert response.model_versions["reranker"].startswith(("train_ranker/v-", "finetune_ranker/v-"))
    assert response.request_id != first.request_id
    assert {"features", "retrieval", "rerank", "total"} <= set(response.timings_ms)


def test_scores_are_the_rerankers_probabilities_of_each_user_item_row(
    tiny_run: RayrecConfig, recommender: Recommender
) -> None:
    """Recomputed outside the recommender, rows in another order: item ids, retrieval scores
    (user vector · item tower) and calibrated probabilities line up item by item."""
    bundle = recommender.bundle
    model, calibrator = bundle.reranker.model, bundle.reranker.calibrator
    assert RETRIEVAL_SCORE in bundle.spec.names
    reordered = 0
    for user in _known_users(recommender, 5):
        response = recommender.recommend(RecommendationRequest(user_id=user, k=K))
        ids = np.sort([item.item_id for item in response.items])
        read = recommender.store.read_user(user)
        query = recommender.user_vector(user, list(read.history))
        with torch.no_grad():
            vectors = bundle.two_tower.item_tower(torch.from_numpy(ids)).numpy()
        retrieval = vectors @ query[0]
        frame = online_frame(
            user,
            read,
            ids,
            recommender.store.read_items(ids.tolist()),
            _as_of(tiny_run),
            bundle.users,
            bundle.items,
            recommender.features.windows_days,
            position=SCORING_POSITION,
        ).with_columns(pl.Series(RETRIEVAL_SCORE, retrieval, dtype=pl.Float64))
        part = encode_examples(frame, bundle.spec, labelled=False)
        with torch.no_grad():
            logits = model(part.batch(slice(None))).outputs["click"].double().numpy()
        expected = calibrator.transform(logits) if calibrator else 1 / (1 + np.exp(-logits))
        by_item = dict(zip(ids.tolist(), expected, strict=True))
        by_item_retrieval = dict(zip(ids.tolist(), retrieval, strict=True))
        for item in response.items:
            assert item.score == pytest.approx(by_item[item.item_id], abs=1e-6)
            assert item.retrieval_score == pytest.approx(by_item_retrieval[item.item_id], abs=1e-5)
        returned = [item.retrieval_score for item in response.items]
        reordered += returned != sorted(returned, reverse=True)
    # The reranker's order is its own, not retrieval's.
    assert reordered > 0


def test_category_filters_hold_and_a_narrow_one_still_fills_k(recommender: Recommender) -> None:
    items = recommender.bundle.items
    category = dict(zip(items["item_id"].to_list(), items["category"].to_list(), strict=True))
    user = _known_users(recommender, 1)[0]
    seen = set(recommender.store.read_user(user).history)
    sizes = items.filter(~pl.col("item_id").is_in(list(seen))).group_by("category").len()
    # The rarest category: retrieval's top N alone rarely holds k of them.
    rare = sizes.sort("len").row(0, named=True)
    request = RecommendationRequest(
        user_id=user, k=K, filters=Filters(category_in=(rare["category"],))
    )
    response = recommender.recommend(request)
    assert len(response.items) == min(K, rare["len"])
    assert {category[i.item_id] for i in response.items} == {rare["category"]}
    out = ("c0", "c1")
    response = recommender.recommend(
        RecommendationRequest(user_id=user, k=K, filters=Filters(category_out=out))
    )
    assert len(response.items) == K
    assert not {category[i.item_id] for i in response.items} & set(out)
    # A category no item has: nothing passes, an empty answer rather than an error.
    nothing = Filters(category_in=("no-such-category",))
    assert (
        recommender.recommend(RecommendationRequest(user_id=user, k=K, filters=nothing)).items == ()
    )


def test_an_unknown_user_gets_the_most_popular_k_with_fallback(recommender: Recommender) -> None:
    reads = recommender.store.read_items(recommender.catalogue.ids.tolist())
    window = max(recommender.features.windows_days)
    popular = reads.sort(
        [popularity_column(window), "item_id"], descending=[True, False]
    ).get_column("item_id")
    excluded = (int(popular[0]),)
    for user in (10**9, 2**63 - 1):  # past the two-tower; the schema refuses negative ids
        response = recommender.recommend(
            RecommendationRequest(user_id=user, k=K, exclude_item_ids=excluded)
        )
        assert response.fallback and not response.reranked
        assert [i.item_id for i in response.items] == popular[1 : K + 1].to_list()
        counts = [i.score for i in response.items]
        assert counts == sorted(counts, reverse=True) and counts[0] > 0
    # A user of the users table that has no events is unknown to the store: fallback too.
    stored = {u for u in range(recommender._n_users) if recommender.store.read_user(u).found}
    silent = next(u for u in range(recommender._n_users) if u not in stored)
    assert recommender.recommend(RecommendationRequest(user_id=silent, k=K)).fallback


def test_k_past_the_catalogue_gives_every_eligible_item_once(tiny_run: RayrecConfig) -> None:
    big = ServingConfig(candidates=10_000, max_k=10_000)
    recommender = _recommender(tiny_run, big)
    try:
        catalogue = set(recommender.catalogue.ids.tolist())
        k = len(catalogue) + 50
        user = _known_users(recommender, 1)[0]
        seen = set(recommender.store.read_user(user).history)
        for user_id, expected in ((user, catalogue - seen), (10**9, catalogue)):
            response = recommender.recommend(RecommendationRequest(user_id=user_id, k=k))
            ids = [i.item_id for i in response.items]
            assert len(ids) == len(set(ids)) == len(expected)
            assert set(ids) == expected and min(ids) >= 0
        with pytest.raises(RequestError, match="max_k"):
            recommender.recommend(RecommendationRequest(user_id=user, k=10_001))
    finally:
        recommender.close()


def test_an_item_newer_than_the_two_tower_is_served_by_its_content_only_vector(
    tiny_run: RayrecConfig, tmp_path: Path
) -> None:
    """Cold start: two items past the trained range with item 3's attributes, indexed
    content-only as the index step does, answer similar-items (each other first: the same
    vector), are retrieved and reranked (no online-store rows yet) and pass MMR."""
    index_json = published(tiny_run, "index").path.join("index.json")  # type: ignore[union-attr]
    assert json.loads(index_json.read_text())["content_only_items"] == 0  # none newer yet
    sources = published_sources(tiny_run)
    model = load_two_tower(sources.two_tower)
    n = model.config.n_items
    items = pl.read_parquet(sources.items)
    twin = items.filter(pl.col("item_id") == 3)
    new = pl.concat([twin.with_columns(pl.lit(i, pl.Int64).alias("item_id")) for i in (n, n + 1)])
    catalogue = catalogue_vectors(
        model, load_item_encoding(sources.two_tower), pl.concat([items, new])
    )
    assert catalogue.content_only == 2
    ExactIndex(catalogue.ids, catalogue.vectors).save(tmp_path / "index")
    pl.concat([items, new]).write_parquet(tmp_path / "items.parquet")
    serving = ServingConfig(
        candidates=10_000, max_k=10_000, diversity=DiversityConfig(mmr_lambda=0.5)
    )
    as_of = _as_of(tiny_run)
    recommender = Recommender.load(
        dataclasses.replace(sources, index=tmp_path / "index", items=tmp_path / "items.parquet"),
        serving,
        tiny_run.features,
        tiny_run.paths.workdir,
        clock=lambda: as_of,
    )
    try:
        similar = recommender.similar_items(n, k=3)
        assert similar.items[0].item_id == n + 1
        assert similar.items[0].score == pytest.approx(1.0, abs=1e-5)
        assert n in {i.item_id for i in recommender.similar_items(n + 1, k=3).items}
        user = _known_users(recommender, 1)[0]
        k = len(recommender.catalogue)
        response = recommender.recommend(RecommendationRequest(user_id=user, k=k))
        assert response.reranked and not response.fallback
        by_id = {i.item_id: i for i in response.items}
        assert {n, n + 1} <= set(by_id)
        assert all(0.0 <= by_id[i].score <= 1.0 for i in (n, n + 1))
    finally:
        recommender.close()


def test_past_the_deadline_the_retrieval_order_is_served(tiny_run: RayrecConfig) -> None:
    recommender = _recommender(tiny_run, ServingConfig(deadline_ms=1e-6))
    try:
        user = _known_users(recommender, 1)[0]
        response = recommender.recommend(RecommendationRequest(user_id=user, k=K))
        assert not response.reranked and not response.fallback and len(response.items) == K
        scores = [i.score for i in response.items]
        assert scores == [i.retrieval_score for i in response.items]
        assert scores == sorted(scores, reverse=True)
    finally:
        recommender.close()


def test_the_deadline_counts_from_arrival(recommender: Recommender) -> None:
    """A request that waited past the deadline before its turn is served in retrieval order."""
    import time

    user = _known_users(recommender, 1)[0]
    request = RecommendationRequest(user_id=user, k=K)
    assert recommender.recommend(request, arrived=time.perf_counter()).reranked
    late = recommender.recommend(request, arrived=time.perf_counter() - 1.0)
    assert not late.reranked and late.timings_ms["total"] >= 1000.0


def test_online_rows_equal_the_training_frame_at_the_same_moment(
    tiny_run: RayrecConfig, recommender: Recommender
) -> None:
    """Training/serving skew: the candidate rows built from the online store equal the
    offline store's point-in-time rows at the store's as_of (HLL counts within their error)."""
    data = published(tiny_run, "validate").path  # type: ignore[union-attr]
    features = published(tiny_run, "features").path  # type: ignore[union-attr]
    prior = json.loads(features.join("prior.json").read_text())
    as_of = _as_of(tiny_run)
    length = tiny_run.features.history_length
    # Users whose every positive is in the stored history: category_affinity is exact for them.
    users = [
        u
        for u in _known_users(recommender, 50)
        if recommender.store.read_user(u).values["positives_total"] <= length
    ][:3]
    assert users
    items = np.arange(0, len(recommender.catalogue), 7, dtype=np.int64)
    names = [f.name for f in recommender.bundle.spec.features if f.name != RETRIEVAL_SCORE]
    for user in users:
        read = recommender.store.read_user(user)
        online = online_frame(
            user,
            read,
            items,
            recommender.store.read_items(items.tolist()),
            as_of,
            recommender.bundle.users,
            recommender.bundle.items,
            tiny_run.features.windows_days,
        ).sort("item_id")
        rows = pl.DataFrame(
            {
                "user_id": np.full(items.size, user),
                "item_id": items,
                "ts": pl.Series([as_of] * items.size, dtype=pl.Datetime("us", "UTC")),
                "position": np.zeros(items.size, dtype=np.int64),
            }
        )
        offline = build_training_frame(
            rows,
            read_events(data),
            read_table(data.join("users.parquet")),
            read_table(data.join("items.parquet")),
            tiny_run.features,
            CtrPrior(rate=prior["rate"], strength=prior["strength"]),
        ).sort("item_id")
        for name in names:
            got, want = online.get_column(name), offline.get_column(name)
            if want.dtype.is_numeric():
                # Sketch counts are HLL estimates online, exact offline.
                rtol = 0.05 if name in ("user_distinct_items", "item_distinct_users") else 1e-9
                np.testing.assert_allclose(
                    got.cast(pl.Float64).to_numpy(),
                    want.cast(pl.Float64).to_numpy(),
                    rtol=rtol,
                    atol=1e-9,
                    equal_nan=True,
                    err_msg=name,
                )
            else:
                assert got.to_list() == want.to_list(), name
    # An hour later the stored vectors' clocks move on with the request time.
    read = recommender.store.read_user(users[0])
    reads = recommender.store.read_items(items.tolist())
    frames = [
        online_frame(
            users[0],
            read,
            items,
            reads,
            when,
            recommender.bundle.users,
            recommender.bundle.items,
            tiny_run.features.windows_days,
        )
        for when in (as_of, as_of + dt.timedelta(hours=1))
    ]
    for column in ("user_seconds_since_last", "item_seconds_since_last"):
        moved = (frames[1].get_column(column) - frames[0].get_column(column)).drop_nulls()
        assert moved.len() > 0 and moved.to_list() == pytest.approx([3600.0] * moved.len())


def test_a_model_that_cannot_serve_is_refused_at_load(
    tiny_run: RayrecConfig, tmp_path: Path
) -> None:
    sources = published_sources(tiny_run)
    dim = ModelBundle.load(sources).two_tower.config.embedding_dim
    wrong = ExactIndex(np.arange(5, dtype=np.int64), np.ones((5, dim + 1), np.float32))
    wrong.save(tmp_path / "index")
    with pytest.raises(BundleError, match="dimensions"):
        ModelBundle.load(dataclasses.replace(sources, index=tmp_path / "index"))
    empty = load_config("tiny", [f"paths.workdir={tmp_path / 'none'}"], environ={})
    with pytest.raises(NotServable, match="train_retrieval"):
        published_sources(empty)
