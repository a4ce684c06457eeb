"""Two-stage quality on the simulator: retrieve top-N, rerank with the MoE, NDCG@10 of each order.

    python benchmarks/two_stage.py --json benchmarks/results/two_stage.json [--candidates 100]

Protocol (:mod:`pipelines.ranker.two_stage` holds the evaluation itself):

- World: the ``default`` preset's simulator (same click model, policy and
  latent sizes) shrunk so the whole script runs in a few minutes on 2 cores:
  8,000 users, 3,000 items, 10 days, 45,000 impressions a day (``--set
  simulator.…`` changes any of it; 468k events). The default preset's
  popularity shock (day 21) lies past the last day, so this world has no drift.
- Hold-out: the last day (day 9). Both models learn from days 0..8 only:
  the reranker from the point-in-time training frame of those days
  (:func:`features.build.build_features`), split by time (``models.ranker``'s
  temporal 8:1:1; its early stopping uses the validation part, its test part
  is reported as a sanity check); the two-tower from the clicks of days
  0..7, early-stopped on day 8's clicks (full ranking, recall@10), trained
  by a plain loop (:func:`pipelines.retrieval.loop.train_step`, no Ray: the
  same step Ray Train runs, without its start-up).
- Requests: users with at least one click on the held-out day (684 in this
  world), at most ``--requests`` of them drawn at random (seeded); each
  request is the user's first impression time that day; its clicked items
  are everything the user clicked that day.
- Retrieval: the user vector from the clicks of days 0..8 (history) against
  an exact index of the items live on the held-out day, top ``--candidates``.
  Nothing is excluded by default: the simulator's click model has no
  satiation (a clicked item is as relevant the next day) and users do click
  items again, so excluding seen items would drop true positives;
  ``--exclude-seen`` excludes the clicks of days 0..8 (and the global ideal
  then skips them too).
- Rerank: the candidates featurised as of the request time (events strictly
  before it, the held-out day's earlier events of other users included, as an
  online store would hold them), position set to 0 (module doc of
  :mod:`pipelines.ranker.two_stage`), ordered by the reranker's logit.
- Judged at K=10 against the clicks and against the simulator's true
  relevance on the held-out day (the click probability at the top slot):
  ``oracle`` orders the N candidates by true relevance (the best any reranker
  can do with them), ``random`` shuffles them (the floor). Paired bootstrap
  CIs (1,000 resamples of the requests) of every order minus retrieval.
- Clicks exist only where the logging policy showed an item, at the position
  it chose, so click-judged metrics also reward guessing the policy.
  ``{order}_exposed@10`` measures that guess; the ``shown_*`` keys judge each
  order on the candidates the user was shown that day only (unshown ones
  pushed last; requests with a clicked candidate): by clicks, by clicks
  divided by the true ``P(examine | position)`` of each impression
  (``ips_ndcg``, position bias removed) and by true relevance.
- Timings are per request, amortised over the batch of requests (one index
  search, one featurisation, one forward pass): throughput, not latency.

Measured (seed 0, 684 requests): reranking lifts true NDCG@10 from 0.485 to
0.561 (+0.076, CI [+0.061, +0.090]) and lowers click NDCG@10 from 0.426 to
0.143. The two-tower, trained on logged clicks, learns what the logging
policy shows: 56% of its top 10 were shown to the user that day, 19% of the
reranker's and 24% of the oracle's, and the oracle loses on clicks too
(-0.162). On shown items only, position-debiased clicks agree with the truth
(reranked - retrieval IPS NDCG@10 +0.048, true +0.148; raw clicks -0.030).
With ``--exclude-seen`` the true gain is +0.134.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name
# would shadow the `features` package: drop the folder before importing it.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import copy
import datetime as dt
import json
import time
from collections.abc import Callable

import numpy as np
import polars as pl
import torch

from features.build import build_features
from features.simulator import ClickLogSimulator
from features.splits import Split
from infra.config import RetrievalConfig, load_config
from models.index.exact import ExactIndex
from models.metrics import UserItems
from models.optimizers import SparseDenseAdam
from models.retrieval_task import RetrievalTask
from models.two_tower import TwoTowerModel
from pipelines.ranker.loop import configs_from, evaluate, train_epochs
from pipelines.ranker.spec_data import ranker_data_from_examples
from pipelines.ranker.two_stage import (
    TwoStageReport,
    candidate_frame,
    exposed_first,
    first_requests,
    membership,
    rerank_scores,
    retrieve,
    two_stage_report,
)
from pipelines.retrieval.data import RetrievalData, prepare_retrieval_data, recent_history
from pipelines.retrieval.loop import StepInputs, build_model, seed_everything, train_step, validate

# The shrunk default world (module doc); later --set overrides win.
WORLD = (
    "simulator.n_users=8000",
    "simulator.n_items=3000",
    "simulator.n_days=10",
    "simulator.impressions_per_day=45000",
    "simulator.drifts=[]",
)
ORDERS = ("retrieval", "reranked", "oracle", "random")
METRICS = ("ndcg", "recall", "true_ndcg", "global_true_ndcg", "relevance", "exposed")


def day_start(sim: ClickLogSimulator, day: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(sim.world.day_start_us(day) / 1e6, tz=dt.UTC)


def clicks_of(events: pl.DataFrame) -> pl.DataFrame:
    """``user_id, item_id, ts`` of clicked impressions (ratings repeat a click: left out)."""
    return events.filter((pl.col("event_type") == "impression") & (pl.col("label") > 0)).select(
        "user_id", "item_id", "ts"
    )


def ips_gains(
    shown: pl.DataFrame, items: np.ndarray, examine: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """(B, N) per candidate: mean over its impressions of ``click / P(examine | position)``.

    ``shown``: ``row, item_id, position, label`` of the requests' impressions in
    the judged period; 0 for a candidate never shown. With the true examination
    probabilities (the simulator's; a real log estimates them, e.g. by
    randomising the top slots), an unbiased estimate of its relevance.
    """
    weighted = shown.with_columns(
        (pl.col("label") / examine(shown.get_column("position").to_numpy())).alias("gain")
    )
    gains = weighted.group_by("row", "item_id").agg(pl.col("gain").mean())
    b, n = items.shape
    slots = pl.DataFrame(
        {"row": np.repeat(np.arange(b, dtype=np.int64), n), "item_id": items.ravel()}
    )
    joined = slots.join(gains, on=["row", "item_id"], how="left", maintain_order="left")
    return joined.get_column("gain").fill_null(0.0).to_numpy().reshape(b, n)


def train_two_tower(
    data: RetrievalData, config: RetrievalConfig
) -> tuple[TwoTowerModel, list[dict[str, float]]]:
    """Plain loop (benchmarks/training.py's) with early stopping on valid recall@eval_k."""
    seed_everything(config.seed)
    model = build_model(config, data)
    optimizer = SparseDenseAdam(model, config.learning_rate, config.weight_decay)
    task = RetrievalTask(config.temperature, config.logq_correction)
    inputs = StepInputs(data, torch.device("cpu"))
    generator = torch.Generator().manual_seed(config.seed)
    users = torch.as_tensor(data.train_users)
    items = torch.as_tensor(data.train_items)
    key = f"recall@{config.eval_k}"
    best, best_state, stale, history = -1.0, None, 0, []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        model.train()
        losses = []
        for batch in torch.randperm(users.numel(), generator=generator).split(config.batch_size):
            if batch.numel() < 2:
                continue
            losses.append(
                train_step(
                    model, task, optimizer, users[batch], items[batch], inputs, config, generator
                )
            )
        recall = validate(model, data, inputs, (config.eval_k,))[key]
        history.append(
            {
                "epoch": epoch,
                "loss": float(np.mean(losses)),
                f"valid_{key}": recall,
                "seconds": time.perf_counter() - started,
            }
        )
        if recall > best:
            best, best_state, stale = recall, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, history


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--requests", type=int, default=1000, help="held-out users evaluated")
    parser.add_argument("--candidates", type=int, default=100, help="N retrieved per request")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--exclude-seen", action="store_true")
    parser.add_argument("--ranker-epochs", type=int, default=None, help="cap (default: config)")
    parser.add_argument("--retrieval-epochs", type=int, default=None, help="cap (default: config)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (2 ran ~10x slower on a busy 2-core box)",
    )
    parser.add_argument("--set", action="append", default=[], help="config override a.b=c")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    overrides = [*WORLD, *args.set]
    if args.ranker_epochs is not None:
        overrides.append(f"models.ranker.epochs={args.ranker_epochs}")
    if args.retrieval_epochs is not None:
        overrides.append(f"models.retrieval.epochs={args.retrieval_epochs}")
    config = load_config("default", overrides=overrides)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[f"{name}_s"] = round(now - since, 2)
        return now

    # ---------------------------------------------------------------- world
    mark = time.perf_counter()
    sim = ClickLogSimulator(config.simulator, threads=args.threads)
    events = pl.concat(list(sim.iter_event_chunks()))
    test_day = config.simulator.n_days - 1
    test_start, test_end = day_start(sim, test_day), day_start(sim, test_day + 1)
    history_events = events.filter(pl.col("ts") < test_start)
    mark = lap("simulate", mark)

    # ---------------------------------------------------------------- reranker
    features = build_features(history_events.lazy(), sim.users, sim.items, config.features)
    examples = features.examples.collect()
    mark = lap("features", mark)
    ranker = config.models.ranker
    ranker_data = ranker_data_from_examples(
        examples, features.spec, ranker.split, ranker.split_ratios, ranker.seed
    )
    model_config, loop_config = configs_from(ranker)
    trained_ranker = train_epochs(model_config, loop_config, ranker_data)
    reranker = trained_ranker.model
    ranker_test = evaluate(reranker, ranker_data.test)
    mark = lap("train_reranker", mark)

    # ---------------------------------------------------------------- retrieval
    clicks = clicks_of(events)
    valid_start = day_start(sim, test_day - 1)
    split = Split(
        train=clicks.filter(pl.col("ts") < valid_start),
        valid=clicks.filter((pl.col("ts") >= valid_start) & (pl.col("ts") < test_start)),
        test=clicks.filter(pl.col("ts") >= test_start),
        protocol=f"by day: train 0..{test_day - 2}, valid {test_day - 1}, test {test_day}",
    )
    n_users, n_items = sim.users.height, sim.items.height
    retrieval_config = config.models.retrieval
    retrieval_data = prepare_retrieval_data(
        split, sim.users, sim.items, n_users, n_items, retrieval_config, config.features.sketches
    )
    two_tower, retrieval_history = train_two_tower(retrieval_data, retrieval_config)
    mark = lap("train_retrieval", mark)

    # ---------------------------------------------------------------- requests
    # Sorted again: a join does not keep row order, and the draw below must be reproducible.
    requests = (
        first_requests(events, test_start, test_end)
        .join(split.test.select("user_id").unique(), on="user_id", how="semi")
        .sort("user_id")
    )
    rng = np.random.default_rng(args.seed)
    n_requests = min(args.requests, requests.height)
    requests = requests[np.sort(rng.choice(requests.height, n_requests, replace=False))]
    user_ids = requests.get_column("user_id").to_numpy().astype(np.int64)
    row_of = pl.DataFrame({"user_id": user_ids, "row": np.arange(n_requests, dtype=np.int64)})
    test_clicks = split.test.join(row_of, on="user_id", maintain_order="left")
    clicked = UserItems.from_pairs(
        test_clicks.get_column("row").to_numpy(),
        test_clicks.get_column("item_id").to_numpy(),
        n_requests,
    )
    shown = events.filter(
        (pl.col("event_type") == "impression") & (pl.col("ts") >= test_start)
    ).join(row_of, on="user_id", maintain_order="left")
    shown_items = UserItems.from_pairs(
        shown.get_column("row").to_numpy(), shown.get_column("item_id").to_numpy(), n_requests
    )

    # ---------------------------------------------------------------- two stages
    before_test = pl.concat([split.train, split.valid])
    history = torch.as_tensor(recent_history(before_test, n_users, retrieval_config.history_length))
    n_live = sim.n_live_items(test_day)
    with torch.no_grad():
        item_vectors = two_tower.all_item_vectors()[:n_live].float().numpy()
    index = ExactIndex(np.arange(n_live, dtype=np.int64), np.ascontiguousarray(item_vectors))
    seen = UserItems.from_pairs(
        before_test.get_column("user_id").to_numpy(),
        before_test.get_column("item_id").to_numpy(),
        n_users,
    )
    exclude = [seen.items_of(int(u)) for u in user_ids] if args.exclude_seen else None
    mark = time.perf_counter()
    candidates = retrieve(two_tower, history, user_ids, index, args.candidates, exclude)
    mark = lap("retrieve", mark)
    frame = candidate_frame(
        candidates,
        requests.get_column("ts"),
        events.lazy(),
        sim.users,
        sim.items,
        config.features,
        features.prior,
    )
    mark = lap("featurise", mark)
    logits = rerank_scores(reranker, frame, features.spec, candidates.items.shape)
    mark = lap("rerank", mark)

    relevance = sim.relevance(user_ids[:, None], candidates.items, test_day)
    everything = sim.relevance(user_ids[:, None], np.arange(n_live)[None, :], test_day)
    if exclude is not None:
        for row, items in enumerate(exclude):
            everything[row, items] = -np.inf
    global_ideal = -np.partition(-everything, args.k - 1, axis=1)[:, : args.k]
    orders = {
        "retrieval": candidates.scores,
        "reranked": logits,
        "oracle": relevance,
        "random": np.random.default_rng(args.seed + 1).random(relevance.shape),
    }
    exposed = membership(candidates.items, shown_items)
    report = two_stage_report(
        candidates.items,
        orders,
        relevance,
        clicked,
        k=args.k,
        global_ideal=global_ideal,
        exposed=exposed,
    )
    gains = ips_gains(
        shown.select("row", "item_id", "position", "label"),
        candidates.items,
        sim.examine_probability,
    )
    exposure = exposed_report(candidates.items, orders, gains, clicked, exposed, args.k)
    exposure_truth = exposed_report(candidates.items, orders, relevance, clicked, exposed, args.k)
    lap("report", mark)

    # ---------------------------------------------------------------- output
    k = args.k
    results: dict[str, object] = {
        "n_users": n_requests,
        "n_candidates": args.candidates,
        "k": k,
        "exclude_seen": args.exclude_seen,
        **{key: value for key, value in report.metrics.items()},
        **{f"{key}_ci95": list(report.intervals[key]) for key in report.intervals},
        "shown_n_users": exposure.n_requests,
        **shown_keys(exposure, "ips_ndcg"),
        **shown_keys(exposure_truth, "true_ndcg", clicks=False),
        "reranker_test_auc": ranker_test["auc"],
        "reranker_test_gauc": ranker_test["gauc"],
        "reranker_best_epoch": trained_ranker.best_epoch,
        "reranker_epochs": len(trained_ranker.history),
        "retrieval_best_valid_recall@10": max(
            h[f"valid_recall@{retrieval_config.eval_k}"] for h in retrieval_history
        ),
        "retrieval_epochs": len(retrieval_history),
        "per_request_ms": {
            stage: 1000 * timings[f"{stage}_s"] / n_requests
            for stage in ("retrieve", "featurise", "rerank")
        },
        "timings_s": timings,
        "sizes": {
            "world_users": n_users,
            "world_items": n_items,
            "days": config.simulator.n_days,
            "impressions_per_day": config.simulator.world_size.impressions_per_day,
            "events": events.height,
            "reranker_examples": examples.height,
            "reranker_train_valid_test": [
                len(ranker_data.train),
                len(ranker_data.valid),
                len(ranker_data.test),
            ],
            "retrieval_train_valid_test_clicks": list(split.sizes().values()),
            "live_items_test_day": n_live,
            "eligible_requests": requests.height if n_requests == requests.height else None,
            "mean_clicks_per_request": float(clicked.lengths().mean()),
        },
        "config": {
            "ranker": ranker.model_dump(mode="json", exclude={"tuning", "finetune"}),
            "retrieval": retrieval_config.model_dump(mode="json"),
            "simulator": config.simulator.model_dump(mode="json"),
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print_table(report)
    print_exposed(exposure, exposure_truth)
    print(
        f"reranker test AUC {ranker_test['auc']:.4f} (GAUC {ranker_test['gauc']:.4f}); "
        f"retrieval best valid recall@10 {results['retrieval_best_valid_recall@10']:.4f}"
    )
    per_request = results["per_request_ms"]
    print(
        "per request (batch of {n}): retrieve {retrieve:.2f} ms, featurise {featurise:.2f} ms, "
        "rerank {rerank:.2f} ms".format(n=n_requests, **per_request)  # type: ignore[arg-type]
    )
    print(f"timings {timings}; wall {results['wall_s']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return results


def exposed_report(
    items: np.ndarray,
    orders: dict[str, np.ndarray],
    gains: np.ndarray,
    clicked: UserItems,
    exposed: np.ndarray,
    k: int,
) -> TwoStageReport:
    """Each order judged on the candidates the user was shown that day only.

    Requests with a clicked candidate; a request's relevant set is its clicked
    candidates (so recall measures the order, not what retrieval missed);
    ``gains`` (B, N) the graded gains (:func:`ips_gains`: position-debiased clicks).
    """
    hits = membership(items, clicked)
    keep = np.flatnonzero(hits.any(axis=1))
    rows, slots = np.nonzero(hits[keep])
    kept_clicks = UserItems.from_pairs(rows, items[keep][rows, slots], keep.size)
    return two_stage_report(
        items[keep],
        {name: scores[keep] for name, scores in exposed_first(orders, exposed).items()},
        # Gains of unshown candidates are 0, so the ideal order is over the shown ones.
        np.where(exposed, gains, 0.0)[keep],
        kept_clicks,
        k=k,
    )


def shown_keys(report: TwoStageReport, graded: str, clicks: bool = True) -> dict[str, object]:
    """A shown-only report's keys, ``shown_`` prefixed, its graded NDCG named ``graded``."""
    k = report.k
    out: dict[str, object] = {}
    wanted = (f"_true_ndcg@{k}",) + ((f"_ndcg@{k}", f"_recall@{k}") if clicks else ())
    for key, value in report.metrics.items():
        if not key.endswith(wanted) or "global" in key:
            continue
        name = "shown_" + key.replace(f"true_ndcg@{k}", f"{graded}@{k}")
        out[name] = value
        if "minus" in key:
            out[f"{name}_ci95"] = list(report.intervals[key])
    return out


def print_exposed(report: TwoStageReport, truth: TwoStageReport) -> None:
    k = report.k
    print(
        f"\nshown items only ({report.n_requests} requests with a clicked candidate; "
        "ips: clicks / P(examine | position))"
    )
    columns = (
        (report, "ndcg", "ndcg"),
        (report, "recall", "recall"),
        (report, "true_ndcg", "ips_ndcg"),
        (truth, "true_ndcg", "true_ndcg"),
    )
    print(f"{'order':<10}" + "".join(f"{f'{label}@{k}':>23}" for _, _, label in columns))
    for order in ORDERS:
        line = f"{order:<10}"
        for part, name, _ in columns:
            line += f"{part.metrics[f'{order}_{name}@{k}']:>23.4f}"
        print(line)
    print("minus retrieval, mean [95% CI]")
    for order in ORDERS[1:]:
        line = f"{order:<10}"
        for part, name, _ in columns:
            key = f"{order}_minus_retrieval_{name}@{k}"
            low, high = part.intervals[key]
            line += f"{f'{part.metrics[key]:+.3f} [{low:+.3f},{high:+.3f}]':>23}"
        print(line)


def print_table(report: TwoStageReport) -> None:
    """Orders by metrics, then each order minus retrieval with its paired 95% CI."""
    k, n = report.k, report.n_candidates
    metrics, intervals = report.metrics, report.intervals
    names = [f"{m}@{k}" for m in METRICS]
    print(f"\ntwo-stage, {report.n_requests} held-out requests, N={n} candidates, K={k}")
    print(f"{'order':<10}" + "".join(f"{name:>23}" for name in names) + f"{'spearman':>10}")
    for order in ORDERS:
        cells = "".join(f"{metrics[f'{order}_{name}']:>23.4f}" for name in names)
        print(f"{order:<10}{cells}{metrics[f'{order}_spearman']:>10.3f}")
    print("minus retrieval, mean [95% CI]")
    for order in ORDERS[1:]:
        cells = ""
        for name in names:
            key = f"{order}_minus_retrieval_{name}"
            low, high = intervals[key]
            cells += f"{f'{metrics[key]:+.3f} [{low:+.3f},{high:+.3f}]':>23}"
        print(f"{order:<10}{cells}")
    print(f"candidate_recall@{n} {metrics[f'candidate_recall@{n}']:.4f}")


if __name__ == "__main__":
    main()
