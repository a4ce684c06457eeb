"""The click-log simulator: invariants and numbers derivable by hand, no golden values.

Click checks use the exact calibration z-score: given the ground truth, each
logged click is an independent Bernoulli(examine(p) * relevance), so
``z = (clicks - sum p) / sqrt(sum p (1 - p))`` is ~N(0, 1) whatever the seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from features.dataset import read_events, read_table
from features.schemas import EVENTS, ITEMS, USERS
from features.simulator import ClickLogSimulator
from features.validation import validate_table
from infra.config import SimulatorConfig, load_config
from infra.storage import StoragePath

Z_BOUND = 4.5  # |z| above this happens with probability < 1e-5 under the model


def make_config(**overrides: Any) -> SimulatorConfig:
    base = load_config("tiny", environ={}).simulator.model_dump()
    return SimulatorConfig.model_validate({**base, **overrides})


def all_events(sim: ClickLogSimulator, days: range | None = None) -> pl.DataFrame:
    return pl.concat(list(sim.iter_event_chunks(days)))


def impressions(events: pl.DataFrame) -> pl.DataFrame:
    return events.filter(pl.col("event_type") == "impression")


def day_of(events: pl.DataFrame, sim: ClickLogSimulator) -> np.ndarray:
    start = np.datetime64(sim.config.start_date, "D")
    ts = events["ts"].dt.replace_time_zone(None).to_numpy()
    return (ts.astype("datetime64[D]") - start).astype(np.int64)


def calibration_z(sim: ClickLogSimulator, imps: pl.DataFrame, truth_day: int | None) -> float:
    """z of logged clicks against examine * relevance on ``truth_day`` (None: each row's day)."""
    days = day_of(imps, sim) if truth_day is None else np.full(imps.height, truth_day)
    users, items = imps["user_id"].to_numpy(), imps["item_id"].to_numpy()
    rel = np.empty(imps.height)
    for day in np.unique(days):
        rows = days == day
        rel[rows] = sim.relevance(users[rows], items[rows], int(day))
    p = sim.examine_probability(imps["position"].to_numpy()) * rel
    return float((imps["label"].sum() - p.sum()) / np.sqrt(np.sum(p * (1 - p))))


# --------------------------------------------------------------------------- world


def test_catalogue_grows_evenly_and_items_are_never_shown_before_they_are_live() -> None:
    sim = ClickLogSimulator(make_config(n_items=200, initial_item_fraction=0.5, n_days=5))
    first_seen_day = (
        (sim.items["first_seen"].dt.date() - sim.config.start_date).dt.total_days().to_numpy()
    )
    # 100 live on day 0, the other 100 spread evenly over days 1..4.
    assert np.bincount(first_seen_day).tolist() == [100, 25, 25, 25, 25]
    assert [sim.n_live_items(d) for d in range(5)] == [100, 125, 150, 175, 200]

    events = all_events(sim).join(sim.items.select("item_id", "first_seen"), on="item_id")
    assert events.filter(pl.col("ts") < pl.col("first_seen")).height == 0
    # Cold-start items do get shown once they are live.
    assert events.filter(pl.col("item_id") >= 100)["item_id"].n_unique() > 50


def test_users_and_items_carry_typed_attributes() -> None:
    sim = ClickLogSimulator(make_config())
    assert sim.users.schema == pl.Schema(
        {
            "user_id": pl.Int64,
            "segment": pl.String,
            "age_bucket": pl.String,
            "device": pl.String,
            "activity": pl.Float64,
        }
    )
    assert sim.items.schema["first_seen"] == pl.Datetime("us", "UTC")
    assert sim.users["segment"].n_unique() == sim.config.n_user_segments
    assert sim.users["activity"].min() >= 1.0  # Pareto with x_m = 1
    assert validate_table(sim.users, USERS).quarantined.height == 0
    assert validate_table(sim.items, ITEMS).quarantined.height == 0


# --------------------------------------------------------------------------- slates


def test_slates_have_distinct_items_and_propensities_sum_to_one() -> None:
    sim = ClickLogSimulator(make_config())
    per_slate = (
        impressions(all_events(sim))
        .group_by("request_id")
        .agg(
            pl.len().alias("n"),
            pl.col("item_id").n_unique().alias("distinct"),
            pl.col("propensity").sum().alias("total"),
            pl.col("position").sort().alias("positions"),
            pl.col("user_id").n_unique().alias("users"),
        )
    )
    k = sim.config.slate_size
    assert per_slate.height == sim.config.n_days * sim.traffic.requests_per_day
    assert (per_slate["n"] == k).all() and (per_slate["distinct"] == k).all()
    assert (per_slate["users"] == 1).all()
    assert np.allclose(per_slate["total"].to_numpy(), 1.0, atol=1e-12)
    assert per_slate["positions"].to_list()[0] == list(range(k))


def test_propensity_is_the_softmax_of_policy_scores_over_the_slate() -> None:
    sim = ClickLogSimulator(make_config(policy_temperature=0.7))
    users = sim.sample_users(500, day=0, rng=np.random.default_rng(0))
    slates = sim.sample_slates(users, day=0, rng=np.random.default_rng(1))
    scores = sim.policy.scores(users, slates.items, sim.policy.day_tables(0)) / 0.7
    expected = np.exp(scores - scores.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    assert np.allclose(slates.propensity, expected, rtol=1e-5)
    # Plackett–Luce order: each position's score is the highest of the rest only
    # in distribution, but the first-position propensity is largest on average.
    assert slates.propensity[:, 0].mean() > slates.propensity[:, -1].mean()


# --------------------------------------------------------------------------- clicks


def test_click_rate_falls_with_position_as_examine_probability_says() -> None:
    # A huge temperature makes the slate order uniformly random, so items are
    # equally relevant at every position and CTR(p) / CTR(0) = examine(p) / examine(0).
    config = make_config(
        policy_temperature=1e6, examine_decay=1.0, impressions_per_day=40_000, n_days=2
    )
    sim = ClickLogSimulator(config)
    imps = impressions(all_events(sim))
    assert np.allclose(imps["propensity"].to_numpy(), 1 / config.slate_size, atol=1e-4)
    ctr = imps.group_by("position").agg(pl.col("label").mean(), pl.len()).sort("position")
    c, n = ctr["label"].to_numpy(), ctr["len"].to_numpy()
    ratio = c / c[0]
    expected = sim.examine_probability(np.arange(config.slate_size))  # 1 / (1 + p)
    assert np.allclose(expected, 1 / (1 + np.arange(config.slate_size)))
    # Delta-method standard error of a ratio of two binomial means.
    se = ratio * np.sqrt((1 - c) / (n * c) + (1 - c[0]) / (n[0] * c[0]))
    assert np.all(np.abs(ratio - expected)[1:] < Z_BOUND * se[1:])
    assert np.all(np.diff(c) < 0)


def test_logged_clicks_are_calibrated_to_the_ground_truth() -> None:
    sim = ClickLogSimulator(make_config(impressions_per_day=10_000, n_days=3))
    assert abs(calibration_z(sim, impressions(all_events(sim)), None)) < Z_BOUND


def test_respond_matches_the_click_model_in_expectation() -> None:
    sim = ClickLogSimulator(make_config())
    rng = np.random.default_rng(3)
    users = rng.integers(0, sim.config.world_size.n_users, 50)
    slates = np.stack([rng.choice(sim.n_live_items(2), 5, replace=False) for _ in users])
    p = sim.click_probability(users, slates, day=2)
    # The model's structure: examine(position) * relevance, exactly.
    assert np.allclose(
        p, sim.examine_probability(np.arange(5))[None, :] * sim.relevance(users[:, None], slates, 2)
    )
    reps = 2_000
    clicks = sum(sim.respond(users, slates, 2, rng).astype(np.int64) for _ in range(reps))
    assert clicks.shape == (50, 5)
    z = (clicks.sum() - reps * p.sum()) / np.sqrt(reps * np.sum(p * (1 - p)))
    assert abs(z) < Z_BOUND
    # Per position too: the position effect is in respond, not only in the log.
    z_pos = (clicks.sum(0) - reps * p.sum(0)) / np.sqrt(reps * np.sum(p * (1 - p), axis=0))
    assert np.all(np.abs(z_pos) < Z_BOUND)
    # One user for every slate broadcasts.
    assert sim.respond(7, slates, 2, rng).shape == (50, 5)


def test_ratings_follow_clicks() -> None:
    sim = ClickLogSimulator(make_config(rating_probability=0.5))
    events = all_events(sim)
    ratings = events.filter(pl.col("event_type") == "rating")
    clicked = impressions(events).filter(pl.col("label") == 1.0)
    assert 0 < ratings.height <= clicked.height
    # Each rating belongs to a clicked impression of the same request, user and item.
    assert ratings.join(clicked, on=["request_id", "user_id", "item_id"], how="anti").height == 0
    assert ratings["value"].is_in([1.0, 2.0, 3.0, 4.0, 5.0]).all()
    assert (ratings["label"] == (ratings["value"] >= 4).cast(pl.Float64)).all()
    assert ratings["position"].null_count() == ratings.height
    assert ratings["propensity"].null_count() == ratings.height
    # About half the clicks are rated: binomial, 4.5 standard errors.
    share, n = ratings.height / clicked.height, clicked.height
    assert abs(share - 0.5) < Z_BOUND * np.sqrt(0.25 / n)


# --------------------------------------------------------------------------- drift


def _drifted(kind: str, day: int, **kw: Any) -> tuple[ClickLogSimulator, ClickLogSimulator]:
    base = make_config(impressions_per_day=5_000, n_days=4)
    drifted = SimulatorConfig.model_validate(
        {**base.model_dump(), "drifts": [{"kind": kind, "day": day, **kw}]}
    )
    return ClickLogSimulator(base), ClickLogSimulator(drifted)


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("covariate", {"strength": 0.3}),
        ("concept", {"strength": 1.0}),
        ("popularity_shock", {"strength": 0.1, "boost": 20.0}),
    ],
)
def test_days_before_a_drift_are_identical_to_a_world_without_it(kind: str, params: dict) -> None:
    plain, drifted = _drifted(kind, 2, **params)
    assert all_events(plain, range(2)).equals(all_events(drifted, range(2)))
    assert not all_events(plain, range(2, 3)).equals(all_events(drifted, range(2, 3)))
    assert drifted.users.head(plain.users.height).equals(plain.users)


def test_covariate_drift_brings_a_new_segment_with_its_traffic_share() -> None:
    _, sim = _drifted("covariate", 2, strength=0.3)
    new_segment = f"s{sim.config.n_user_segments}"
    new_users = sim.users.filter(pl.col("segment") == new_segment)
    n_base = sim.config.world_size.n_users
    assert new_users.height == round(0.3 * n_base)  # 90 users, ids after the base
    assert new_users["user_id"].min() == n_base
    imps = impressions(all_events(sim)).with_columns(
        day=pl.Series(day_of(impressions(all_events(sim)), sim)),
        new=pl.col("user_id").is_in(new_users["user_id"].implode()),
    )
    share = imps.group_by("day").agg(pl.col("new").mean()).sort("day")["new"].to_list()
    assert share[:2] == [0.0, 0.0]
    # Sessions (mean 3 requests) are the independent unit: ~1,000 per day here.
    n_sessions = sim.traffic.requests_per_day / sim.config.mean_session_requests
    assert all(abs(s - 0.3) < Z_BOUND * np.sqrt(0.3 * 0.7 / n_sessions) for s in share[2:])


def test_concept_drift_turns_preferences_and_breaks_the_old_truth() -> None:
    _, sim = _drifted("concept", 2, strength=1.0)  # theta = pi / 2
    old, new = sim.world.user_vectors(0), sim.world.user_vectors(2)
    cos = np.sum(old * new, 1) / np.linalg.norm(old, axis=1) / np.linalg.norm(new, axis=1)
    assert np.allclose(cos, 0.0, atol=1e-9)  # cos(theta), every user
    assert np.allclose(np.linalg.norm(old, axis=1), np.linalg.norm(new, axis=1))
    assert np.array_equal(sim.world.user_vectors(1), old)

    imps = impressions(all_events(sim))
    days = day_of(imps, sim)
    before, after = imps.filter(pl.Series(days < 2)), imps.filter(pl.Series(days >= 2))
    assert abs(calibration_z(sim, before, 0)) < Z_BOUND
    assert abs(calibration_z(sim, after, None)) < Z_BOUND  # the new truth explains clicks
    # The stale policy still shows what users used to like: far fewer clicks than
    # the old truth predicts.
    assert calibration_z(sim, after, 0) < -3 * Z_BOUND


def test_popularity_shock_boosts_a_share_of_items_from_its_day() -> None:
    _, sim = _drifted("popularity_shock", 2, strength=0.1, boost=20.0)
    ratio = sim.popularity(3) / sim.popularity(0)
    boosted = np.flatnonzero(ratio > 1)
    assert np.allclose(ratio[boosted], 20.0) and np.all(np.delete(ratio, boosted) == 1.0)
    assert np.array_equal(sim.popularity(1), sim.popularity(0))
    assert abs(boosted.size / ratio.size - 0.1) < Z_BOUND * np.sqrt(0.09 / ratio.size)

    imps = impressions(all_events(sim))
    shown_boosted = imps["item_id"].is_in(boosted).to_numpy()
    days = day_of(imps, sim)
    before, after = shown_boosted[days < 2].mean(), shown_boosted[days >= 2].mean()
    assert after > 2 * before


# --------------------------------------------------------------------------- output


def test_written_dataset_is_valid_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    config = make_config()
    first = StoragePath.from_uri(tmp_path / "a")
    counts = ClickLogSimulator(config, threads=2).write(first)

    assert json.loads(first.join("dataset.json").read_text()) == {
        "kind": "interactions",
        "name": "simulator",
        "ts_unit": "us",
    }
    events = read_events(first).collect()
    assert counts == {"events": events.height, "users": 300, "items": 200}
    # Each row sits in the partition of its own UTC date.
    for file in first.join("events").files():
        folder_date = file.path.split("date=")[1].split("/")[0]
        dates = read_table(file).get_column("ts").dt.date().cast(pl.String)
        assert (dates == folder_date).all(), file.path
    result = validate_table(events, EVENTS)
    assert result.quarantined.height == 0 and result.valid.height == events.height
    assert events["request_id"].filter(events["event_type"] == "impression").n_unique() == (
        config.n_days * 2000 // config.slate_size
    )
    assert read_table(first.join("users.parquet")).height == 300

    again = StoragePath.from_uri(tmp_path / "b")
    ClickLogSimulator(config, threads=1).write(again)  # thread count never changes output
    assert again.content_hash() == first.content_hash()
    other = StoragePath.from_uri(tmp_path / "c")
    ClickLogSimulator(make_config(seed=8)).write(other)
    assert other.content_hash() != first.content_hash()


def test_chunks_stay_within_chunk_rows_and_hold_whole_requests_of_one_day() -> None:
    config = make_config(chunk_rows=1_000, rating_probability=1.0)
    sim = ClickLogSimulator(config)
    chunks = list(sim.iter_event_chunks())
    assert len(chunks) > config.n_days
    seen: set[int] = set()
    for chunk in chunks:
        assert 0 < chunk.height <= 1_000
        assert np.unique(day_of(chunk, sim)).size == 1
        requests = set(chunk["request_id"].unique().to_list())
        assert not requests & seen  # no request is split across chunks
        seen |= requests
