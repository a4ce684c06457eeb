"""evaluate_two_stage: retrieve top-N, rerank the N, judge both orders at K on held-out requests.

The serving path is two-tower retrieval → reranker; this step measures what
the second stage adds, with the models the pipeline trained (``train_retrieval``'s
``model/`` searched through the ``index`` step's candidate index; the
reranker of ``finetune_ranker`` when it published one, else ``train_ranker``'s)
and the machinery of :mod:`pipelines.ranker.two_stage`.

Protocol (what "held out" means, and why):

- **Period**: from the reranker's test cut on, the first example of the
  reranker's temporal test part (``models.ranker.split_ratios``; the reranker
  never trained on, early-stopped on or calibrated on anything after it).
  When the fine-tuned model is the one judged, from the start of its holdout
  instead (the last part of its window: it tuned on the part before; the
  holdout also chose it, a mild selection effect, so its base model is judged
  beside it as ``base_reranked`` on the same candidates). A reranker trained
  on a random split has no held-out period: the step skips.
- **Requests**: each user's first example row in the period (an impression in
  a click log, a rating in a rating log) is one request at that time; at most
  :data:`MAX_REQUESTS` users, drawn at random (seeded) when more qualify.
- **Judged items**: the user's positive items (``label > 0``) in the period
  from the request time on, except the pairs the two-tower trained on at or
  after the request time: with ``models.split.kind: random`` (the default)
  it trained on most of the period's clicks, and an item it saw the user
  click *later* would credit retrieval with knowledge of the future. Pairs
  it trained on only before the request stay: a model trained up to the
  request would know them too, and re-clicks are real (the simulator has no
  satiation). A request needs at least one judged item.
- **Retrieval**: the user vector from the user's last
  ``features.history_length`` positives strictly before the request (the
  features' ``user_history``: what the online store serves, and what the
  reranker's ``retrieval_score`` feature was computed from), against the
  candidate index; excluded are the same future-trained pairs (retrieval's
  own protocol leaves out what it trained on) and items not live yet
  (``first_seen`` after the request, where the items table has it). ``N`` =
  :data:`N_CANDIDATES` (less when a request has fewer eligible items).
- **Rerank**: the candidates featurised as of the request time (point in
  time, position 0; :func:`~pipelines.ranker.two_stage.candidate_frame`, which
  also carries the retrieval score), ordered by the reranker's click logit.
- **Judgement** (:func:`~pipelines.ranker.two_stage.two_stage_report`): Recall
  and NDCG at :data:`K` of each order against the judged items,
  ``candidate_recall@N`` (the ceiling of any reranker), ``{order}_exposed@K``
  on click logs (share of the top K that the logging policy showed the user
  in the period: clicks can only land there), ``{order}_overlap@K`` (share of
  retrieval's top K the order keeps: how much the reranker changes the list),
  and paired bootstrap 95% CIs of every order minus retrieval.
- **Ground truth** (simulated data only): the simulator's world is a pure
  function of the ``simulator`` config, so it is rebuilt here (and checked
  against the ingested users and items); each candidate's true relevance on
  the request's day gives ``{order}_true_ndcg@K`` (within the N),
  ``{order}_global_true_ndcg@K`` (against the best K of the whole live
  catalogue, excluded items left out) and the ``oracle`` order (the N by
  true relevance: the best any reranker can do with them).

Reading the figures: on the simulator the reranker raises true NDCG@K while
click NDCG@K falls, because the two-tower, trained on logged clicks, learns
what the logging policy shows (its ``exposed@K`` is high) and clicks only
land on shown items; ``benchmarks/two_stage.py`` separates the two effects.
On the benchmark's world (8,000 users, 3,000 items, 10 days, tuning off) the
pipeline measured true NDCG@10 0.494 → 0.579 (+0.085, CI +0.040, +0.134)
and click NDCG@10 0.380 → 0.033 over 65 requests (the fine-tuned reranker
won, so only the last ~7 hours were held out).

Memory: the log is a scan, never collected. The test cut comes from per-day
counts, the requests from a streaming per-user minimum; the drawn users'
impressions and histories are read for them alone. What grows with the log is
O(users of the period) and the positives' keys (three integer columns), which
the two-tower's split needs whole (:func:`period_positives`).

Publishes ``two_stage.json`` (every metric, its CI as ``<key>_ci95``, ``N``,
``K``, ``n_requests`` and the protocol's parameters); skips with the reason
(``{"skipped": ...}``) for CTR tables, missing models and too few requests.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from features.aggregates import CtrPrior
from features.dataset import dataset_kind, read_events, read_examples, read_table
from features.pit import recent_positives_at
from features.splits import make_split
from features.training_frame import has_impressions
from infra.config import RayrecConfig, SimulatorSourceConfig, SplitConfig
from models.artifacts import load_reranker, load_two_tower
from models.metrics import UserItems
from models.two_tower import PAD, history_rows
from pipelines.ranker.encoded import temporal_cuts
from pipelines.ranker.two_stage import (
    TwoStageReport,
    candidate_frame,
    membership,
    order_of,
    rerank_scores,
    retrieve,
    two_stage_report,
)
from pipelines.retrieval.registry import metric_name
from pipelines.step import Step, StepContext, StepResult
from pipelines.steps.ranker import ranker_spec, tuned_settings
from pipelines.steps.retrieval import positives

# Candidates retrieved per request (N) and the cut-off judged (K).
N_CANDIDATES = 100
K = 10
# Held-out requests evaluated at most: keeps the featurisation of N x requests
# rows to seconds on the default preset (a bootstrap CI over 500 requests is
# already narrow next to the differences that matter).
MAX_REQUESTS = 500
# Fewer requests than this is too little to judge anything (the tiny preset
# has about a dozen users in its held-out period).
MIN_REQUESTS = 3
# Seeds the request draw and the bootstrap.
SEED = 0
RESULT_FILE = "two_stage.json"
DAY_US = 86_400_000_000


@dataclass(frozen=True)
class HeldOut:
    """The held-out requests of one period, aligned by row.

    ``requests`` ``user_id, ts`` (B rows); ``clicked`` each request's judged
    items; ``exclude`` (B,) int64 arrays of item ids retrieval may not return;
    ``shown`` the items the logging policy showed each user in the period from
    the request on (None for a log without impressions); ``eligible`` the users
    that qualified before the draw.
    """

    requests: pl.DataFrame
    clicked: UserItems
    exclude: list[np.ndarray]
    shown: UserItems | None
    eligible: int


def held_out_start(ctx: StepContext, examples_ts: pl.LazyFrame) -> tuple[dt.datetime | None, str]:
    """The start of the period the judged reranker never learned from, and which reranker it is.

    ``examples_ts`` a scan of the ``features`` examples' ``ts`` column. None when
    the reranker's split holds no period out (random, or an empty test part). The
    test cut comes from per-day counts (:func:`~pipelines.ranker.encoded.temporal_cuts`,
    the cut ``train_ranker`` made); only the fine-tune's window (``window_days``) is
    ever read as values.
    """
    settings = tuned_settings(ctx)
    if settings.split != "temporal":
        return None, "trained"
    _, start = temporal_cuts(examples_ts, settings.split_ratios)
    if start is None:
        return None, "trained"
    finetuned = Path(ctx.input_path("finetune_ranker").local_path())
    if not (finetuned / "model").exists():
        return start, "trained"
    from pipelines.ranker.finetune import window_start

    record = json.loads((finetuned / "finetune.json").read_text())
    since = window_start(examples_ts, int(record["window_days"]))
    # The fine-tune tuned on the window's first rows["tune"] rows by time; its holdout
    # starts at the next row's time (split_examples cuts at a row's timestamp).
    ordered = (
        examples_ts.filter(pl.col("ts") >= since)
        .select(pl.col("ts").sort())
        .collect(engine="streaming")
        .get_column("ts")
    )
    holdout_start = ordered[int(record["rows"]["tune"])]
    return max(start, holdout_start), "finetuned"


def held_out_requests(
    events: pl.LazyFrame | pl.DataFrame,
    clicks: pl.LazyFrame | pl.DataFrame,
    trained_pairs: pl.LazyFrame | pl.DataFrame,
    items: pl.DataFrame,
    start: dt.datetime,
    max_requests: int = MAX_REQUESTS,
    seed: int = SEED,
) -> HeldOut:
    """Requests, judged items and exclusions of the period from ``start`` (module doc).

    ``events`` the validated log (a scan: only the period's per-user first rows
    and the drawn users' impressions are read); ``clicks`` its positives
    (``user_id, item_id, ts``, :func:`~pipelines.steps.retrieval.positives`; those
    before ``start`` are not needed); ``trained_pairs`` the positives the two-tower
    trained or early-stopped on (its train and valid parts; likewise); ``items``
    the items table (``first_seen`` is used when there).
    """
    events = events.lazy()
    clicks_log = has_impressions(events)
    rows = (
        events.filter(pl.col("event_type") == "impression")
        if clicks_log
        else events.filter(pl.col("label").is_not_null())
    )
    # O(users of the period): one request time per user, a streaming aggregate.
    firsts = (
        rows.filter(pl.col("ts") >= start)
        .group_by("user_id")
        .agg(pl.col("ts").min().alias("request_ts"))
        .collect(engine="streaming")
    )
    later = (
        clicks.lazy().join(firsts.lazy(), on="user_id").filter(pl.col("ts") >= pl.col("request_ts"))
    )
    # Pairs the two-tower trained on at or after the request: knowledge of that future.
    future = (
        trained_pairs.lazy()
        .join(firsts.lazy(), on="user_id")
        .filter(pl.col("ts") >= pl.col("request_ts"))
        .select("user_id", "item_id")
        .unique()
        .collect(engine="streaming")
    )
    judged = (
        later.select("user_id", "item_id")
        .unique()
        .join(future.lazy(), on=["user_id", "item_id"], how="anti")
        .collect(engine="streaming")
    )
    # Sorted again after the joins: the draw below must be reproducible.
    eligible = firsts.join(judged.select("user_id").unique(), on="user_id", how="semi").sort(
        "user_id"
    )
    n = min(max_requests, eligible.height)
    picked = np.sort(np.random.default_rng(seed).choice(eligible.height, n, replace=False))
    requests = eligible[picked].select("user_id", pl.col("request_ts").alias("ts"))
    row_of = requests.select("user_id", pl.int_range(pl.len(), dtype=pl.Int64).alias("row"))

    def per_request(pairs: pl.DataFrame) -> UserItems:
        on_rows = pairs.join(row_of, on="user_id").sort("row", "item_id")
        return UserItems.from_pairs(
            on_rows.get_column("row").to_numpy(), on_rows.get_column("item_id").to_numpy(), n
        )

    clicked = per_request(judged)
    excluded = [future]
    if "first_seen" in items.columns:
        # Items that do not exist yet at the request time cannot be recommended.
        newer = items.filter(pl.col("first_seen") > start).select("item_id", "first_seen")
        unborn = (
            requests.join(newer, how="cross")
            .filter(pl.col("first_seen") > pl.col("ts"))
            .select("user_id", "item_id")
        )
        excluded.append(unborn)
    exclude_sets = per_request(pl.concat(excluded).unique())
    exclude = [exclude_sets.items_of(row) for row in range(n)]
    shown = None
    if clicks_log:
        # The drawn users' impressions only (at most max_requests users).
        seen = (
            events.filter(
                (pl.col("event_type") == "impression")
                & (pl.col("ts") >= start)
                & pl.col("user_id").is_in(requests.get_column("user_id").implode())
            )
            .select("user_id", "item_id", "ts")
            .join(requests.lazy(), on="user_id", suffix="_request")
            .filter(pl.col("ts") >= pl.col("ts_request"))
            .select("user_id", "item_id")
            .unique()
            .collect(engine="streaming")
        )
        shown = per_request(seen)
    return HeldOut(requests, clicked, exclude, shown, eligible.height)


def period_positives(
    events: pl.LazyFrame, split: SplitConfig, start: dt.datetime
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The log's positives from ``start`` on, and those of them the two-tower trained or
    early-stopped on (its split's train and valid parts).

    The split (``models.split``: random by default) is a function of every positive
    (a seeded permutation over all of them, or global time cuts), so it is made on
    all of them, three integer columns (24 bytes a positive, a few percent of the
    events in a click log), never on the events; what leaves is the period's part.
    """
    every = positives(events)
    made = make_split(every, split)
    in_period = pl.col("ts") >= start
    trained = pl.concat([made.train, made.valid.select(made.train.columns)]).filter(in_period)
    return every.filter(in_period), trained


def user_histories(
    events: pl.LazyFrame, requests: pl.DataFrame, length: int, n_items: int
) -> tuple[torch.Tensor, np.ndarray]:
    """``(U, L)`` history rows by user id and the requests' user ids (one request per user).

    A request's history is the features' ``user_history`` at its time: the
    user's last ``length`` positive items strictly before it, most recent last
    (:func:`features.pit.recent_positives_at`), as the online store serves it
    and as the reranker's ``retrieval_score`` feature reads it
    (:mod:`pipelines.ranker.retrieval_feature`), so the retrieval score of a
    candidate is the number that feature was trained on. Item ids the model
    does not know (``>= n_items``) are left out. Only the requests' users' events
    are read.
    """
    rows = requests.select("user_id", "ts").with_row_index("_row")
    # A filter (not a join) keeps the log's row order, which breaks ties in ts.
    theirs = events.filter(pl.col("user_id").is_in(requests.get_column("user_id").implode()))
    recent = recent_positives_at(rows, theirs, length).sort("_row")
    user_ids = requests.get_column("user_id").to_numpy().astype(np.int64)
    history = np.full((int(user_ids.max()) + 1, length), PAD, dtype=np.int64)
    for user, items in zip(user_ids, recent.get_column("history").to_list(), strict=True):
        history[user] = history_rows(items, length, n_items)
    return torch.as_tensor(history), user_ids


@dataclass(frozen=True)
class Truth:
    """The simulator's ground truth for the candidates: relevance (B, N), best K overall (B, K)."""

    relevance: np.ndarray
    global_ideal: np.ndarray


def simulator_truth(
    config: RayrecConfig,
    meta: dict[str, str],
    users: pl.DataFrame,
    items: pl.DataFrame,
    held: HeldOut,
    candidates: np.ndarray,
    k: int,
) -> tuple[Truth | None, str]:
    """Ground truth when the data is this config's simulated world (None and why not otherwise).

    The world is a pure function of ``config.simulator``: rebuilt, not saved.
    """
    if meta.get("name") != "simulator" or not isinstance(config.data.source, SimulatorSourceConfig):
        return None, "not simulated data"
    from features.simulator import ClickLogSimulator

    sim = ClickLogSimulator(config.simulator, threads=1)
    if sim.users.height != users.height or sim.items.height != items.height:
        return None, (
            f"the simulator config's world ({sim.users.height} users, {sim.items.height} items) "
            f"is not the ingested one ({users.height}, {items.height})"
        )
    start_us = sim.world.day_start_us(0)
    ts_us = held.requests.get_column("ts").dt.epoch("us").to_numpy()
    days = (ts_us - start_us) // DAY_US
    user_ids = held.requests.get_column("user_id").to_numpy()
    relevance = np.zeros(candidates.shape)
    global_ideal = np.zeros((candidates.shape[0], k))
    for day in np.unique(days):
        rows = np.flatnonzero(days == day)
        relevance[rows] = sim.relevance(user_ids[rows, None], candidates[rows], int(day))
        n_live = sim.n_live_items(int(day))
        everything = sim.relevance(user_ids[rows, None], np.arange(n_live)[None, :], int(day))
        for local, row in enumerate(rows):
            gone = held.exclude[row]
            everything[local, gone[gone < n_live]] = -np.inf
        global_ideal[rows] = -np.partition(-everything, k - 1, axis=1)[:, :k]
    return Truth(relevance, global_ideal), "simulator world rebuilt from the config"


def _skipped(ctx: StepContext, reason: str) -> StepResult:
    ctx.output.join(RESULT_FILE).write_text_atomic(json.dumps({"skipped": reason}))
    return StepResult(extra={"skipped": reason})


def _reranker_folder(ctx: StepContext, which: str) -> Path:
    step = "finetune_ranker" if which == "finetuned" else "train_ranker"
    return Path(ctx.input_path(step).local_path()) / "model"


def run_evaluate_two_stage(ctx: StepContext) -> StepResult:
    started = time.perf_counter()
    data = ctx.input_path("validate")
    meta = dataset_kind(data)
    if meta["kind"] == "ctr":
        return _skipped(ctx, "a CTR table has no users and items to retrieve for")
    retrieval = Path(ctx.input_path("train_retrieval").local_path()) / "model"
    index_folder = Path(ctx.input_path("index").local_path()) / "index"
    if not retrieval.exists():
        return _skipped(ctx, "no retrieval model")
    if not index_folder.exists():
        return _skipped(ctx, "no candidate index")
    if not (Path(ctx.input_path("train_ranker").local_path()) / "model").exists():
        return _skipped(ctx, "no reranker")
    features = ctx.input_path("features")
    start, which = held_out_start(ctx, read_examples(features).select("ts"))
    if start is None:
        return _skipped(
            ctx, "the reranker was trained on a random split: no period is held out from it"
        )

    # A scan, never the log: each use below filters it to what it needs.
    events = read_events(data)
    users = read_table(data.join("users.parquet"))
    items = read_table(data.join("items.parquet"))
    clicks, trained_pairs = period_positives(events, ctx.config.models.split, start)
    held = held_out_requests(events, clicks, trained_pairs, items, start)
    del clicks, trained_pairs
    if held.requests.height < MIN_REQUESTS:
        return _skipped(
            ctx,
            f"too few held-out requests: {held.requests.height} user(s) with a judged click "
            f"from {start.isoformat()} on (at least {MIN_REQUESTS} needed)",
        )

    # Imported here: Faiss loads (and logs) on import.
    from models.index import load_index

    two_tower = load_two_tower(retrieval)
    index = load_index(index_folder)
    most_excluded = max(int(np.unique(e).size) for e in held.exclude)
    n = min(N_CANDIDATES, len(index) - most_excluded)
    if n < K:
        return _skipped(ctx, f"only {n} eligible candidates for some request, fewer than K={K}")
    history, user_ids = user_histories(
        events,
        held.requests,
        ctx.config.features.history_length,
        two_tower.config.n_items,
    )
    candidates = retrieve(two_tower, history, user_ids, index, n, held.exclude)

    prior_record = json.loads(features.join("prior.json").read_text())
    prior = CtrPrior(rate=prior_record["rate"], strength=prior_record["strength"])
    # The spec the reranker was trained with (the features' own plus, when it is on,
    # retrieval_score); a fine-tuned model reads the same.
    spec = ranker_spec(ctx, _reranker_folder(ctx, "trained"))
    frame = candidate_frame(
        candidates,
        held.requests.get_column("ts"),
        events,
        users,
        items,
        ctx.config.features,
        prior,
    )
    shape = candidates.items.shape
    orders = {
        "retrieval": candidates.scores,
        "reranked": rerank_scores(
            load_reranker(_reranker_folder(ctx, which)).model, frame, spec, shape
        ),
    }
    if which == "finetuned":
        orders["base_reranked"] = rerank_scores(
            load_reranker(_reranker_folder(ctx, "trained")).model, frame, spec, shape
        )

    truth, truth_note = simulator_truth(ctx.config, meta, users, items, held, candidates.items, K)
    hits = membership(candidates.items, held.clicked)
    if truth is not None:
        orders["oracle"] = truth.relevance
    report = two_stage_report(
        candidates.items,
        orders,
        truth.relevance if truth is not None else hits.astype(np.float64),
        held.clicked,
        k=K,
        global_ideal=truth.global_ideal if truth is not None else None,
        exposed=membership(candidates.items, held.shown) if held.shown is not None else None,
        seed=SEED,
    )
    metrics, intervals = _judged_keys(report, truth is not None)
    for name, scores in orders.items():
        if name != "retrieval":
            metrics[f"{name}_overlap@{K}"] = top_k_overlap(scores, candidates.scores, K)
    record: dict[str, Any] = {
        "N": n,
        "K": K,
        "n_requests": report.n_requests,
        "eligible_requests": held.eligible,
        "held_out_from": start.isoformat(),
        "reranker": which,
        "ground_truth": truth is not None,
        "ground_truth_note": truth_note,
        "retrieval_split": ctx.config.models.split.kind,
        "mean_judged_per_request": float(held.clicked.lengths().mean()),
        **metrics,
        **{f"{key}_ci95": list(bounds) for key, bounds in intervals.items()},
        "wall_s": round(time.perf_counter() - started, 2),
    }
    ctx.output.join(RESULT_FILE).write_text_atomic(json.dumps(record, indent=2, default=float))
    logged = {metric_name(f"two_stage_{key}"): value for key, value in metrics.items()}
    for key, (low, high) in intervals.items():
        if "_minus_" in key:
            logged[metric_name(f"two_stage_{key}_ci_low")] = low
            logged[metric_name(f"two_stage_{key}_ci_high")] = high
    return StepResult(
        row_counts={"requests": report.n_requests, "candidates": report.n_requests * n},
        metrics=logged,
        artifacts=(RESULT_FILE,),
        extra={"reranker": which, "ground_truth": truth is not None},
    )


def top_k_overlap(scores: np.ndarray, baseline: np.ndarray, k: int) -> float:
    """Mean share of the baseline's top ``k`` that ``scores`` (B, N) also put in their top ``k``.

    1.0: the order only shuffles within retrieval's top k (K-cut metrics cannot move
    by more than that shuffle); lower: it brings candidates up from deeper in the N.
    """
    ours = order_of(scores)[:, :k]
    theirs = order_of(baseline)[:, :k]
    shared = (ours[:, :, None] == theirs[:, None, :]).any(axis=2).sum(axis=1)
    return float(shared.mean() / k)


# Metrics that need graded ground truth: meaningless without the simulator.
_TRUTH_KEYS = ("true_ndcg@", "relevance@", "spearman")


def _judged_keys(
    report: TwoStageReport, has_truth: bool
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """The report's means and CIs, without the graded keys when there is no ground truth."""

    def keep(key: str) -> bool:
        return has_truth or not any(part in key for part in _TRUTH_KEYS)

    metrics = {key: value for key, value in report.metrics.items() if keep(key)}
    intervals = {key: bounds for key, bounds in report.intervals.items() if keep(key)}
    return metrics, intervals


EVALUATE_TWO_STAGE = Step(
    name="evaluate_two_stage",
    run=run_evaluate_two_stage,
    description="retrieve top-N, rerank, Recall/NDCG@K of both orders on held-out requests",
    inputs=(
        "validate",
        "features",
        "train_retrieval",
        "index",
        "tune_ranker",
        "train_ranker",
        "finetune_ranker",
    ),
    config_keys=(
        "data.source",
        "simulator",
        "models.split",
        "models.ranker",
        "features.windows_days",
        "features.ctr_prior_strength",
        "features.history_length",
    ),
    code=(
        "pipelines.ranker.encoded",
        "pipelines.ranker.two_stage",
        "pipelines.steps.two_stage",
        "serving.encoding",
        "serving.scoring",
        "pipelines.steps.ranker",
        "features.training_frame",
        "features.pit",
        "features.simulator",
    ),
)
