"""The A/B simulation on a small simulated world: split, propensities, truth, off-policy."""

from __future__ import annotations

import numpy as np
import pytest

from features.simulator import ClickLogSimulator
from infra.config import SimulatorConfig
from pipelines.abtest import (
    POLICIES,
    AbTestError,
    AbTestSettings,
    PolicyContext,
    PopularityRanking,
    RankedArm,
    in_arm_b,
    simulate,
)
from pipelines.cli import main

SMALL = SimulatorConfig(
    n_users=3000, n_items=600, n_days=2, impressions_per_day=1000, slate_size=5, latent_dim=8
)


@pytest.fixture(scope="module")
def sim() -> ClickLogSimulator:
    return ClickLogSimulator(SMALL, threads=1)


def _arms(sim: ClickLogSimulator, settings: AbTestSettings) -> tuple:
    from infra.config import RayrecConfig

    ctx = PolicyContext(sim, RayrecConfig(), settings)
    return POLICIES[settings.a](ctx, "a"), POLICIES[settings.b](ctx, "b")


def test_hash_split_is_deterministic_salted_and_near_the_share() -> None:
    users = np.arange(20_000)
    first = in_arm_b(users, "exp1", 30)
    assert np.array_equal(first, in_arm_b(users, "exp1", 30))
    assert np.array_equal(first[[5, 17]], in_arm_b([5, 17], "exp1", 30))  # order-free
    assert 0.28 < first.mean() < 0.32
    assert (first != in_arm_b(users, "exp2", 30)).mean() > 0.3  # a new salt reshuffles
    # A larger share only adds users to B (same buckets): nobody leaves it.
    assert np.all(in_arm_b(users, "exp1", 50)[first])


def test_explored_propensities_are_the_marginals(sim: ClickLogSimulator) -> None:
    # One user, many requests: the empirical frequency of (item, position) matches the
    # logged propensity (1 - eps) [top] + eps / pool.
    arm = RankedArm(PopularityRanking(sim), epsilon=0.4, pool=8)
    users = np.zeros(40_000, dtype=np.int64)
    shown = arm.serve(users, 0, 5, np.random.default_rng(0))
    top = PopularityRanking(sim).rank(users[:1], 0, 8)[0]
    for position in (0, 3):
        item = shown.items[:, position]
        for candidate, expected in ((top[position], 0.6 + 0.05), (top[7], 0.05)):
            assert (item == candidate).mean() == pytest.approx(expected, abs=0.01)
            logged = shown.propensity[item == candidate, position]
            assert np.allclose(logged, expected)
    # Each slate's items are distinct and come from the pool.
    assert all(len(set(row)) == 5 for row in shown.items[:200].tolist())
    assert np.isin(shown.items, top).all()


def test_true_lift_is_covered_and_off_policy_recovers_b(sim: ClickLogSimulator) -> None:
    settings = AbTestSettings(
        a="popularity", b="affinity", users=3000, days=3, explore=0.5, candidates=20, bootstrap=200
    )
    result = simulate(sim, *_arms(sim, settings), settings)
    record = result.to_dict()
    assert record["true_lift"] > 0.01  # personalised reranking beats the popular list
    assert record["ab_ci_low"] <= record["true_lift"] <= record["ab_ci_high"]
    assert record["ab_ci_low"] > 0 and record["ab_p_value"] < 0.01
    assert record["ope_coverage"] == 1.0  # affinity reorders popularity's pool
    assert record["snips_ctr"] == pytest.approx(record["true_ctr_b"], rel=0.15)
    counts = record["counts"]
    assert counts["users_a"] + counts["users_b"] == 3000
    assert counts["impressions_a"] + counts["impressions_b"] == counts["requests"] * 5
    assert len(record["daily"]["day"]) == 3 and record["daily"]["day"][0] == SMALL.n_days


def test_a_a_test_has_zero_true_lift(sim: ClickLogSimulator) -> None:
    settings = AbTestSettings(a="affinity", b="affinity", users=2000, days=2, bootstrap=100)
    result = simulate(sim, *_arms(sim, settings), settings)
    assert result.true_lift == 0.0  # same deterministic policy on the same requests
    assert result.lift.ci_low <= 0.0 <= result.lift.ci_high


def test_stochastic_arms_and_no_off_policy_without_marginals(sim: ClickLogSimulator) -> None:
    settings = AbTestSettings(a="logging", b="random", users=500, days=1, bootstrap=50)
    result = simulate(sim, *_arms(sim, settings), settings)
    assert result.off_policy is None and "propensities" in result.note
    assert result.true_ctr["a"] > result.true_ctr["b"]  # the logging policy beats random


def test_settings_and_cli_reject_bad_input() -> None:
    with pytest.raises(AbTestError, match="unknown policy"):
        AbTestSettings(a="nope")
    with pytest.raises(AbTestError, match="share_b"):
        AbTestSettings(share_b=100)
    assert main(["abtest", "simulate", "--a", "nope", "--no-track"]) != 0


def test_arm_log_estimates_b_on_the_logged_requests(sim: ClickLogSimulator) -> None:
    # ope_log "arm": only A's half is logged; B's truth on exactly those requests is reported.
    settings = AbTestSettings(
        a="popularity",
        b="affinity",
        users=3000,
        days=3,
        explore=0.5,
        candidates=20,
        bootstrap=50,
        ope_log="arm",
    )
    record = simulate(sim, *_arms(sim, settings), settings).to_dict()
    assert record["ope_logged_slots"] == record["counts"]["impressions_a"]
    assert record["snips_ci_low"] <= record["true_ctr_b_on_logged"] <= record["snips_ci_high"]
    with pytest.raises(AbTestError, match="ope_log"):
        AbTestSettings(ope_log="both")  # type: ignore[arg-type]
