"""HLL and Count-Min sketch features: error bounds, merge equivalence, contracts.

Bounds a reviewer can derive, no golden numbers: HLL relative standard error
sigma = 1.04 / sqrt(2 ** lg_k); Count-Min never underestimates and
overestimates by at most epsilon * N (with probability 1 - delta per item).
Exact counts come from Polars on the same events.
"""

from __future__ import annotations

import datetime as dt
import math
import typing
from typing import Any

import datasketches as ds
import numpy as np
import numpy.typing as npt
import polars as pl
import pytest

from features import sketches as sk
from features.simulator import ClickLogSimulator
from features.sketches.base import CMS_READABLE_SEED, HLL_TYPES
from infra.config import SimulatorConfig, SketchConfig, load_config

DEFAULT = SketchConfig()
# lg_k 7 goes dense at a dozen distinct values, so the tiny world exercises both modes.
SMALL_HLL = sk.HllConfig(lg_k=7, tgt_type="HLL_8")


def simulate(**overrides: Any) -> pl.DataFrame:
    base = load_config("tiny", environ={}).simulator.model_dump()
    config = SimulatorConfig.model_validate({**base, **overrides})
    return pl.concat(list(ClickLogSimulator(config).iter_event_chunks()))


@pytest.fixture(scope="module")
def tiny_events() -> pl.DataFrame:
    """~10k events, 200 items, a few hundred users over 5 days."""
    return simulate()


@pytest.fixture(scope="module")
def wide_events() -> pl.DataFrame:
    """~60k events where item reach runs into the thousands (dense HLLs at lg_k 10)."""
    # A flat, weakly personalised popularity so most of the 150 items reach > 96 users.
    return simulate(
        n_users=4_000,
        n_items=150,
        impressions_per_day=20_000,
        n_days=3,
        zipf_exponent=0.3,
        policy_category_tilt=0.0,
        policy_personalization=0.5,
    )


def mode(serialised: bytes) -> int:
    """0 LIST, 1 SET (sparse), 2 HLL (dense): low bits of byte 7 of the DataSketches HLL preamble."""
    return serialised[7] & 3


def coupons(serialised: bytes) -> npt.NDArray[np.uint32]:
    """The sorted coupon set of a sparse sketch: 4-byte coupons after ``preInts`` 4-byte words."""
    assert mode(serialised) != 2
    return np.sort(np.frombuffer(serialised, dtype="<u4", offset=4 * serialised[0]))


def assert_same_sets(a: pl.DataFrame, b: pl.DataFrame, entity: str, name: str) -> None:
    """Same entities, exactly equal estimates, and the same sketch state.

    Dense sketches are byte-identical; sparse ones hold the same coupon set (their
    serialised order follows insertion order, see features.sketches.hll).
    """
    assert a.get_column(entity).to_list() == b.get_column(entity).to_list()
    assert a.get_column(f"{name}_estimate").to_list() == b.get_column(f"{name}_estimate").to_list()
    for x, y in zip(a[f"{name}_hll"].to_list(), b[f"{name}_hll"].to_list(), strict=True):
        assert mode(x) == mode(y)
        if mode(x) == 2:
            assert x == y
        else:
            np.testing.assert_array_equal(coupons(x), coupons(y))


def exact_distinct(events: pl.DataFrame, entity: str, of: str) -> pl.DataFrame:
    return events.group_by(entity).agg(pl.col(of).n_unique().alias("exact"))


# --------------------------------------------------------------------------- config


def test_shapes_follow_the_config_formulas_and_datasketches_agrees() -> None:
    cms = sk.CmsConfig.from_settings(DEFAULT)
    assert cms.num_buckets == math.ceil(math.e / DEFAULT.cms_epsilon) == 27_183
    assert cms.num_hashes == math.ceil(math.log(1 / DEFAULT.cms_delta)) == 5
    for eps in (0.3, 0.05, 1e-2, 1e-3, 1e-4, 1e-5):
        for delta in (0.5, 0.1, 0.05, 0.01, 1e-3):
            cfg = sk.CmsConfig.from_error(eps, delta)
            assert cfg.num_buckets == ds.count_min_sketch.suggest_num_buckets(eps)
            assert cfg.num_hashes == ds.count_min_sketch.suggest_num_hashes(1 - delta)
    hll = sk.HllConfig.from_settings(DEFAULT)
    assert (hll.lg_k, hll.tgt_type) == (DEFAULT.hll_lg_k, DEFAULT.hll_type)
    assert hll.relative_standard_error == pytest.approx(1.04 / 32)
    assert sk.cms_error_bound(1e-4, 50_000) == pytest.approx(5.0)
    # The mapping from the config's literal to DataSketches types is complete.
    assert set(HLL_TYPES) == set(typing.get_args(SketchConfig.model_fields["hll_type"].annotation))


def test_a_cms_seed_the_python_binding_cannot_read_back_is_rejected() -> None:
    # count_min_sketch.deserialize takes no seed: a sketch with another seed is unreadable.
    probe = ds.count_min_sketch(3, 10, CMS_READABLE_SEED + 1)
    with pytest.raises(ValueError, match="seed"):
        ds.count_min_sketch.deserialize(probe.serialize())
    with pytest.raises(ValueError, match="cms_seed"):
        sk.CmsConfig.from_settings(SketchConfig(cms_seed=CMS_READABLE_SEED + 1))
    with pytest.raises(ValueError, match="lg_k"):
        sk.HllConfig(lg_k=22)


# --------------------------------------------------------------------------- HLL accuracy


@pytest.mark.parametrize("n", [1_000, 10_000, 100_000])
@pytest.mark.parametrize(("lg_k", "kind"), [(10, "HLL_4"), (12, "HLL_6"), (8, "HLL_8")])
def test_hll_relative_error_on_known_distinct_counts(n: int, lg_k: int, kind: Any) -> None:
    cfg = sk.HllConfig(lg_k=lg_k, tgt_type=kind)
    # Each value twice, in two orders: duplicates and order must not matter.
    values = np.arange(n, dtype=np.int64) * 7_919 + 13
    estimate = sk.hll_estimate(sk.update_hll(None, np.concatenate([values, values[::-1]]), cfg))
    # 3 sigma: a Gaussian estimate lands outside with probability 0.3%.
    assert abs(estimate - n) / n <= 3 * cfg.relative_standard_error


def test_hll_estimate_depends_on_the_registers_not_the_bucket_width() -> None:
    # HLL_4/6/8 store the same registers at different widths; canonical estimates agree.
    values = np.arange(5_000, dtype=np.int64)
    estimates = {
        sk.hll_estimate(sk.update_hll(None, values, sk.HllConfig(10, kind))) for kind in HLL_TYPES
    }
    assert len(estimates) == 1


def test_per_entity_estimates_match_polars_n_unique(wide_events: pl.DataFrame) -> None:
    cfg = sk.HllConfig.from_settings(DEFAULT)
    sigma = cfg.relative_standard_error
    for entity, of, frame in (
        ("item_id", "user_id", sk.item_reach(wide_events, DEFAULT)),
        ("user_id", "item_id", sk.user_diversity(wide_events, DEFAULT)),
    ):
        name = "users" if entity == "item_id" else "items"
        checked = frame.join(exact_distinct(wide_events, entity, of), on=entity, how="full")
        assert checked.null_count().sum_horizontal().item() == 0  # same entities on both sides
        est, exact = checked[f"{name}_estimate"].to_numpy(), checked["exact"].to_numpy()
        dense = np.array([mode(b) == 2 for b in checked[f"{name}_hll"].to_list()])
        # Sparse mode keeps 26-bit coupons: exact up to a coupon collision (p ~ n^2 / 2^27,
        # n < 100 here), which loses one value, and a float residue of ~1e-6.
        assert np.all(np.abs(est[~dense] - exact[~dense]) <= 1.0)
        assert np.all(np.abs(est[~dense] - exact[~dense]) < 1e-3)
        rel = np.abs(est[dense] - exact[dense]) / exact[dense]
        if entity == "item_id":
            assert dense.sum() >= 100  # the dense estimator is really exercised
        # Each estimate is outside 3 sigma with probability ~0.3%: allow 1% of the
        # entities (at least one); 5 sigma (p ~ 6e-7 each) must never happen.
        assert np.sum(rel > 3 * sigma) <= max(1, 0.01 * dense.sum())
        assert np.all(rel <= 5 * sigma)


def test_daily_active_users_and_a_window_as_the_merge_of_its_days(
    tiny_events: pl.DataFrame,
) -> None:
    dau = sk.daily_active_users(tiny_events, DEFAULT)
    exact = (
        tiny_events.group_by(pl.col("ts").dt.date().alias("day"))
        .agg(pl.col("user_id").n_unique().alias("exact"))
        .sort("day")
    )
    assert dau.schema == pl.Schema(
        {"day": pl.Date(), "dau_hll": pl.Binary(), "dau_estimate": pl.Float64()}
    )
    assert dau["day"].to_list() == exact["day"].to_list()
    bound = 3 * sk.hll_relative_standard_error(DEFAULT.hll_lg_k)
    assert np.all(np.abs(dau["dau_estimate"] / exact["exact"] - 1).to_numpy() <= bound)
    window = sk.merge_hll(dau["dau_hll"].to_list(), DEFAULT)
    users = tiny_events["user_id"].n_unique()
    assert abs(sk.hll_estimate(window) / users - 1) <= bound
    # The window equals the sketch of all its events, whatever the grouping.
    assert sk.hll_estimate(window) == sk.hll_estimate(
        sk.update_hll(None, tiny_events["user_id"].unique().sort().to_list(), DEFAULT)
    )


# --------------------------------------------------------------------------- HLL merging


@pytest.mark.parametrize("config", [sk.HllConfig.from_settings(DEFAULT), SMALL_HLL])
def test_blocks_merged_and_events_folded_one_by_one_equal_the_batch(
    tiny_events: pl.DataFrame, config: sk.HllConfig
) -> None:
    batch = sk.user_diversity(tiny_events, config)
    modes = {mode(b) for b in batch["items_hll"].to_list()}
    assert {0, 1} & modes  # sparse sketches are covered ...
    if config is SMALL_HLL:
        assert 2 in modes  # ... and dense ones

    # Three blocks, by row ranges and by a shuffled assignment; reduce in two orders.
    third = tiny_events.height // 3
    by_rows = [tiny_events[:third], tiny_events[third : 2 * third], tiny_events[2 * third :]]
    rng = np.random.default_rng(0)
    block_of = rng.integers(0, 3, tiny_events.height)
    by_hash = [tiny_events.filter(pl.Series(block_of == b)) for b in range(3)]
    for blocks in (by_rows, by_hash):
        parts = [sk.user_diversity(block, config) for block in blocks]
        merged = sk.merge_hll_columns(*parts, entity="user_id", name="items", config=config)
        assert_same_sets(merged, batch, "user_id", "items")
        pairwise = sk.merge_hll_columns(
            parts[2],
            sk.merge_hll_columns(parts[1], parts[0], entity="user_id", name="items", config=config),
            entity="user_id",
            name="items",
            config=config,
        )
        assert_same_sets(pairwise, batch, "user_id", "items")

    # Online: fold each event into the stored sketch, in event order.
    store: dict[int, bytes] = {}
    for user, item in tiny_events.select("user_id", "item_id").iter_rows():
        store[user] = sk.update_hll(store.get(user), [item], config)
    users = sorted(store)
    folded = pl.DataFrame(
        {
            "user_id": users,
            "items_hll": [store[u] for u in users],
            "items_estimate": [sk.hll_estimate(store[u]) for u in users],
        }
    )
    assert_same_sets(folded, batch, "user_id", "items")


def test_raw_hip_estimates_would_not_be_merge_invariant() -> None:
    # Why the module canonicalises: DataSketches' in-stream (HIP) estimate depends on
    # the order of updates, so without it "at once" and "merged" would disagree.
    values = list(range(5_000))
    forward, backward = ds.hll_sketch(10), ds.hll_sketch(10)
    for v in values:
        forward.update(v)
    for v in reversed(values):
        backward.update(v)
    assert forward.get_estimate() != backward.get_estimate()
    cfg = sk.HllConfig(10, "HLL_8")
    assert sk.merge_hll([bytes(forward.serialize_compact())], cfg) == sk.merge_hll(
        [bytes(backward.serialize_compact())], cfg
    )


def test_merge_downsamples_to_the_configured_lg_k_without_losing_an_input() -> None:
    # Regression for apache/datasketches-cpp#512: a plain hll_union drops the first
    # (downsampled) sketch here and estimates ~4,100, the second input alone.
    big = sk.update_hll(None, range(3_000), sk.HllConfig(12, "HLL_4"))
    small = sk.update_hll(None, range(2_000, 6_000), sk.HllConfig(10, "HLL_4"))
    bound = 3 * sk.hll_relative_standard_error(10)
    for parts in ([big, small], [small, big], [big, big, small]):
        merged = sk.merge_hll(parts, DEFAULT)
        assert ds.hll_sketch.deserialize(merged).lg_config_k == 10
        assert abs(sk.hll_estimate(merged) / 6_000 - 1) <= bound
    assert sk.merge_hll([big, small], DEFAULT) == sk.merge_hll([small, big], DEFAULT)


# --------------------------------------------------------------------------- Count-Min


def test_cms_never_underestimates_and_stays_within_epsilon_n(tiny_events: pl.DataFrame) -> None:
    cfg = sk.CmsConfig.from_settings(DEFAULT)
    cms = sk.cms_from_events(tiny_events, DEFAULT)
    exact = tiny_events.group_by("item_id").len().sort("item_id")
    over = sk.cms_estimates(cms, exact["item_id"].to_numpy()) - exact["len"].to_numpy()
    assert sk.cms_total_weight(cms) == tiny_events.height
    assert over.min() >= 0
    # 200 items in 27,183 buckets: an item is overestimated at all only if it collides
    # in all 5 rows, p <= (200 / 27183) ** 5 ~ 2e-11 each; far inside epsilon * N.
    assert over.max() <= cfg.error_bound(tiny_events.height)
    # Items never seen are estimated >= 0 and within the same bound.
    unseen = sk.cms_estimates(cms, np.arange(10_000, 10_100))
    assert np.all((unseen >= 0) & (unseen <= cfg.error_bound(tiny_events.height)))


def test_cms_bound_where_it_is_tight() -> None:
    # epsilon 0.01 -> 272 buckets for 2,000 Zipf(1) items: every bucket is shared.
    # An item's error in one row is the weight of the others in its bucket: mean
    # <= N / 272 = epsilon N / e. Exceeding epsilon N in a row needs a heavy item
    # (count > epsilon N; Zipf(1) over 2,000 has 12) in the bucket, p ~ 12 / 272,
    # or ~2.7x the mean from light items (rarer): p_row ~ 0.05, all 5 rows ~ 3e-7,
    # over 2,000 items ~ 6e-4. So the max over items stays within epsilon N.
    cfg = sk.CmsConfig.from_error(epsilon=0.01, delta=0.01)
    rng = np.random.default_rng(3)
    weights = 1.0 / np.arange(1, 2_001)
    items = rng.choice(2_000, size=100_000, p=weights / weights.sum()) * 7_919
    events = pl.DataFrame({"item_id": items.astype(np.int64)})
    cms = sk.cms_from_events(events, cfg)
    exact = events.group_by("item_id").len()
    over = sk.cms_estimates(cms, exact["item_id"].to_numpy()) - exact["len"].to_numpy()
    assert over.min() >= 0
    assert over.max() > 0  # the regime is really tight
    assert over.max() <= cfg.error_bound(events.height)


def test_per_day_sketches_merge_into_the_window_exactly(tiny_events: pl.DataFrame) -> None:
    by_day = sk.cms_by_day(tiny_events, DEFAULT)
    assert by_day.schema == pl.Schema(
        {"day": pl.Date(), "cms": pl.Binary(), "total_weight": pl.Float64()}
    )
    days = tiny_events.group_by(pl.col("ts").dt.date().alias("day")).len().sort("day")
    assert by_day["day"].to_list() == days["day"].to_list()
    assert by_day["total_weight"].to_list() == days["len"].cast(pl.Float64).to_list()
    # Counts add exactly (integers in doubles), so the merged window is byte-identical.
    whole = sk.cms_window(by_day, dt.date.min, dt.date.max, DEFAULT)
    assert whole == sk.cms_from_events(tiny_events, DEFAULT)
    assert whole == sk.merge_cms_many(reversed(by_day["cms"].to_list()), DEFAULT)
    first, last = days["day"][1], days["day"][3]
    in_window = tiny_events.filter(pl.col("ts").dt.date().is_between(first, last))
    assert sk.cms_window(by_day, first, last, DEFAULT) == sk.cms_from_events(in_window, DEFAULT)
    a, b = by_day["cms"][0], by_day["cms"][1]
    assert sk.merge_cms(a, b) == sk.merge_cms(b, a) == sk.merge_cms_many([a, b], DEFAULT)


def test_weighted_counts_and_heavy_hitters(tiny_events: pl.DataFrame) -> None:
    cfg = sk.CmsConfig.from_settings(DEFAULT)
    clicks = sk.cms_from_events(tiny_events, DEFAULT, weight="label")
    exact = tiny_events.group_by("item_id").agg(pl.col("label").sum()).sort("item_id")
    over = sk.cms_estimates(clicks, exact["item_id"].to_numpy()) - exact["label"].to_numpy()
    assert over.min() >= 0
    assert over.max() <= cfg.error_bound(float(tiny_events["label"].sum()))

    cms = sk.cms_from_events(tiny_events, DEFAULT)
    counts = tiny_events.group_by("item_id").len()
    true = dict(counts.iter_rows())
    k = 10
    top = sk.top_items(cms, np.arange(300), k)
    assert top.item_ids.shape == top.estimates.shape == (k,)
    assert np.all(np.diff(top.estimates) <= 0)
    # Every returned item is within epsilon N of the k-th largest true count.
    kth = counts["len"].sort(descending=True)[k - 1]
    slack = cfg.error_bound(tiny_events.height)
    assert all(true.get(int(i), 0) >= kth - slack for i in top.item_ids)
    assert sk.top_items(cms, [5, 3], 10).item_ids.shape == (2,)
    assert sk.top_items(cms, [5, 3], 0).item_ids.shape == (0,)


# --------------------------------------------------------------------------- contracts


def test_serialised_sketches_round_trip(tiny_events: pl.DataFrame) -> None:
    blobs = [
        *sk.item_reach(tiny_events, DEFAULT)["users_hll"].to_list(),
        *sk.item_reach(tiny_events, SMALL_HLL)["users_hll"].to_list(),
    ]
    modes = set()
    for blob in blobs:
        again = bytes(ds.hll_sketch.deserialize(blob).serialize_compact())
        modes.add(mode(blob))
        # Dense: byte-identical. Sparse SET mode re-hashes its coupons on deserialise,
        # so only the coupon set (and the estimate) survives the trip unchanged.
        if mode(blob) == 2:
            assert again == blob
        else:
            np.testing.assert_array_equal(coupons(again), coupons(blob))
        assert sk.hll_estimate(again) == sk.hll_estimate(blob)
    assert modes == {0, 1, 2}  # LIST, SET and HLL all covered
    cms = sk.cms_from_events(tiny_events, DEFAULT)
    assert bytes(ds.count_min_sketch.deserialize(cms).serialize()) == cms


def test_empty_inputs_give_empty_frames_and_sketches(tiny_events: pl.DataFrame) -> None:
    empty = tiny_events.clear()
    for frame, entity, name in (
        (sk.user_diversity(empty, DEFAULT), "user_id", "items"),
        (sk.item_reach(empty, DEFAULT), "item_id", "users"),
        (sk.daily_active_users(empty, DEFAULT), "day", "dau"),
    ):
        assert frame.height == 0
        assert frame.columns == [entity, f"{name}_hll", f"{name}_estimate"]
        assert frame.schema[f"{name}_hll"] == pl.Binary()
        merged = sk.merge_hll_columns(frame, frame, entity=entity, name=name, config=DEFAULT)
        assert merged.schema == frame.schema and merged.height == 0
    assert sk.hll_estimate(sk.update_hll(None, [], DEFAULT)) == 0.0
    assert sk.hll_estimate(sk.merge_hll([], DEFAULT)) == 0.0
    assert sk.hll_estimate(None) == 0.0

    cms = sk.cms_from_events(empty, DEFAULT)
    assert sk.cms_total_weight(cms) == 0.0
    assert sk.cms_estimates(cms, np.array([1, 2])).tolist() == [0.0, 0.0]
    assert sk.cms_estimates(cms, np.array([], dtype=np.int64)).shape == (0,)
    assert sk.cms_by_day(empty, DEFAULT).height == 0
    assert sk.cms_total_weight(sk.merge_cms_many([], DEFAULT)) == 0.0
    assert sk.top_items(cms, [], 3).item_ids.shape == (0,)
    assert sk.sketch_memory(sk.user_diversity(empty, DEFAULT), "items_hll").entities == 0


def test_nulls_are_skipped_not_counted() -> None:
    events = pl.DataFrame(
        {"user_id": [1, 1, None, 2], "item_id": [10, None, 11, 10]},
        schema={"user_id": pl.Int64(), "item_id": pl.Int64()},
    )
    frame = sk.distinct_per_entity(events, "user_id", "item_id", DEFAULT, name="items")
    assert frame["user_id"].to_list() == [1, 2]
    assert [round(x) for x in frame["items_estimate"].to_list()] == [1, 1]
    cms = sk.cms_from_events(events, DEFAULT)
    assert sk.cms_total_weight(cms) == 3.0


def test_wrong_columns_raise_naming_the_column(tiny_events: pl.DataFrame) -> None:
    with pytest.raises(pl.exceptions.ColumnNotFoundError, match="'usr'"):
        sk.distinct_per_entity(tiny_events, "usr", "item_id", DEFAULT)
    with pytest.raises(pl.exceptions.ColumnNotFoundError, match="'items_hll'"):
        sk.merge_hll_columns(tiny_events, entity="user_id", name="items", config=DEFAULT)
    with pytest.raises(pl.exceptions.ColumnNotFoundError, match="'item'"):
        sk.cms_from_events(tiny_events, DEFAULT, key="item")
    with pytest.raises(pl.exceptions.ColumnNotFoundError, match="'clicks'"):
        sk.cms_by_day(tiny_events, DEFAULT, weight="clicks")
    with pytest.raises(pl.exceptions.ColumnNotFoundError, match="'ts'"):
        sk.daily_active_users(tiny_events.drop("ts"), DEFAULT)
    # Float ids hash differently from ints in DataSketches: refused, naming the column.
    with pytest.raises(TypeError, match="'label'"):
        sk.distinct_per_entity(tiny_events, "user_id", "label", DEFAULT)
    negative = tiny_events.with_columns(pl.col("label") - 1.0)
    with pytest.raises(ValueError, match="'label'.*negative"):
        sk.cms_from_events(negative, DEFAULT, weight="label")


def test_memory_per_entity_is_bounded_by_the_config(wide_events: pl.DataFrame) -> None:
    for config in (sk.HllConfig.from_settings(DEFAULT), sk.HllConfig(12, "HLL_8"), SMALL_HLL):
        frame = sk.item_reach(wide_events, config)
        memory = sk.sketch_memory(frame, "users_hll")
        assert memory.entities == frame.height
        assert 0 < memory.mean_bytes <= memory.max_bytes <= config.max_bytes
        assert memory.total_bytes == sum(len(b) for b in frame["users_hll"].to_list())
    cms_memory = sk.sketch_memory(sk.cms_by_day(wide_events, DEFAULT), "cms")
    assert cms_memory.max_bytes == sk.CmsConfig.from_settings(DEFAULT).max_bytes
