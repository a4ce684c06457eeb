"""LoRA fine-tuning of a stale reranker after a concept drift, against full fine-tuning and retraining.

    python benchmarks/lora.py --json benchmarks/results/lora.json

World: the ``default`` preset's simulator, scaled down so the whole run takes
minutes on 2 cores (sizes in the JSON's ``world``), with its popularity shock
replaced by one ``concept`` drift on day D: every user's true preference
vector turns by ``strength · π/2`` (:mod:`features.simulator.world`), so the
same user and item features now predict other clicks. Features are the
point-in-time training frame of :func:`features.build.build_features`; the
feature spec is described on the days before D only (the spec a model
deployed before the drift was saved with) and every model below reads it.

Protocol per seed (the seed draws the world and the training):

- ``stale``: the MoE reranker (``models.ranker`` of the preset) trained on the
  days before D (temporal 80/10/10: ``pre_drift_auc`` is its AUC on the last
  10% of the old regime);
- ``lora`` / ``full``: that model fine-tuned on day D, the first day of the
  new regime (:func:`pipelines.ranker.finetune.finetune`; the day cut 80/20
  by time into train / validation, the best epoch kept); LoRA with the
  preset's ``finetune`` section (rank, alpha, targets, learning rate,
  epochs), full fine-tuning with the same epochs at the training learning rate;
- ``scratch``: a fresh model trained on day D alone (same train / validation);
- ``retrain``: a fresh model trained on everything up to D (the days before D
  + day D's training part, validated on day D's validation part).

Every model is scored on the days after D (the new regime, never trained
on): ``*_auc``. ``stale_auc`` is the baseline measured in the same run, and
``stale_auc_no_drift`` what the same stale model scores on the same days of
the same world without the drift (the simulator's keyed streams keep every
event before D identical; checked), so ``drift_damage_auc`` is the drift's own
cost, apart from the days' distance from training. ``lora_s`` / ``full_s``
are wall seconds of the fine-tunes (copy, epochs, validation, merge),
``lora_param_ratio`` the share of the model's parameters LoRA trains.
Figures are medians over ``--seeds`` (differences are paired per seed, then
the median taken); each seed's figures and epoch histories are under
``per_seed``. Training runs on one thread (see ``--threads``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name
# would shadow the `features` package: drop the folder before importing it.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

import polars as pl
import torch

from features.build import build_features
from features.simulator import ClickLogSimulator
from features.training_frame import describe_frame
from infra.config import DriftEventConfig, FeaturesConfig, SimulatorConfig, load_config
from models.moe import Reranker
from pipelines.ranker.data import RankerData
from pipelines.ranker.finetune import finetune, window_split
from pipelines.ranker.loop import configs_from, evaluate, train_epochs
from pipelines.ranker.spec_data import column_spec, split_examples
from serving.encoding import RankerPart, SpecColumns, encode_examples

MODELS = ("stale", "lora", "full", "scratch", "retrain")


def world_config(args: argparse.Namespace, seed: int, drift: bool = True) -> SimulatorConfig:
    """The default preset's world, smaller, with one concept drift on ``args.drift_day`` (or none)."""
    base = load_config("default", environ={}).simulator.model_dump()
    base.update(
        seed=base["seed"] + seed,
        n_users=args.users,
        n_items=args.items,
        n_days=args.drift_day + 1 + args.eval_days,
        impressions_per_day=args.impressions_per_day,
        drifts=[
            DriftEventConfig(
                kind="concept", day=args.drift_day, strength=args.strength
            ).model_dump()
        ]
        if drift
        else [],
    )
    return SimulatorConfig.model_validate(base)


@dataclass(frozen=True)
class World:
    """One simulated log: its simulator, events and point-in-time training frame (all days)."""

    simulator: ClickLogSimulator
    events: pl.DataFrame
    examples: pl.DataFrame


def simulate(config: SimulatorConfig, features: FeaturesConfig, threads: int) -> World:
    simulator = ClickLogSimulator(config, threads=threads)
    events = pl.concat(list(simulator.iter_event_chunks()))
    outputs = build_features(events.lazy(), simulator.users, simulator.items, features)
    return World(simulator, events, outputs.examples.collect())


def _by_time(frame: pl.DataFrame, share: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The first ``share`` of rows by ``ts`` and the rest (ties stay on one side)."""
    train, valid, test = split_examples(frame, "temporal", (share, 1 - share, 0.0))
    return train, pl.concat([valid, test])


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    start = time.perf_counter()
    preset = load_config(args.preset, args.set, environ={})
    settings = preset.models.ranker
    model_config, train_config = configs_from(settings)
    train_config = dataclasses.replace(train_config, seed=seed)

    world = simulate(world_config(args, seed), preset.features, args.threads)
    simulator, examples = world.simulator, world.examples
    day = (pl.col("ts").dt.date() - pl.lit(simulator.config.start_date)).dt.total_days()
    pre = examples.filter(day < args.drift_day)
    # The same world without the drift: its keyed random streams make every event
    # before D identical (checked), so the stale model is the one it would have
    # trained, and its AUC on the days after D is what it would have scored had
    # nothing changed. (Not bit-identical features: the CTR smoothing prior is the
    # global rate of the whole log, which the drift lowers.)
    control = simulate(world_config(args, seed, drift=False), preset.features, args.threads)
    if not control.events.filter(day < args.drift_day).equals(
        world.events.filter(day < args.drift_day)
    ):
        raise RuntimeError("the world without the drift differs before the drift day")
    control_after = control.examples.filter(day > args.drift_day)
    upto, window = window_split(
        examples.filter(day <= args.drift_day), settings.finetune.window_days
    )
    after = examples.filter(day > args.drift_day)
    spec = describe_frame(pre, preset.features, simulator.users.height, simulator.items.height)
    columns = SpecColumns.of(spec, examples.columns)

    def encode(frame: pl.DataFrame) -> RankerPart:
        return encode_examples(frame, spec, columns)

    def data(train: pl.DataFrame, valid: pl.DataFrame) -> RankerData:
        return RankerData(
            layout=columns.layout(),
            spec=column_spec(columns),
            train=encode(train),
            valid=encode(valid),
            test=test_part,
            vocabularies={},
            numeric_stats={},
        )

    test_part = encode(after)
    pre_train, pre_valid, pre_test = split_examples(pre, "temporal", (0.8, 0.1, 0.1))
    ft_train, ft_valid = _by_time(window, 0.8)
    prepared_s = time.perf_counter() - start

    stale = train_epochs(model_config, train_config, data(pre_train, pre_valid))
    pre_drift = evaluate(stale.model, encode(pre_test))
    ft_train_part, ft_valid_part = encode(ft_train), encode(ft_valid)
    lora = finetune(
        stale.model, ft_train_part, ft_valid_part, settings.finetune, "lora",
        settings.batch_size, seed,
    )  # fmt: skip
    full = finetune(
        stale.model, ft_train_part, ft_valid_part, settings.finetune, "full",
        settings.batch_size, seed, learning_rate=settings.learning_rate,
    )  # fmt: skip
    scratch = train_epochs(model_config, train_config, data(ft_train, ft_valid))
    retrain = train_epochs(model_config, train_config, data(pl.concat([upto, ft_train]), ft_valid))

    models: dict[str, Reranker] = {
        "stale": stale.model,
        "lora": lora.model,
        "full": full.model,
        "scratch": scratch.model,
        "retrain": retrain.model,
    }
    scores = {name: evaluate(model, test_part) for name, model in models.items()}
    no_drift = evaluate(stale.model, encode(control_after))
    total = sum(p.numel() for p in stale.model.parameters())
    row: dict[str, Any] = {
        "seed": seed,
        "pre_drift_auc": pre_drift["auc"],
        "stale_auc_no_drift": no_drift["auc"],
        **{f"{name}_auc": scores[name]["auc"] for name in MODELS},
        **{f"{name}_gauc": scores[name]["gauc"] for name in MODELS},
        **{f"{name}_logloss": scores[name]["logloss"] for name in MODELS},
        "lora_params": lora.trainable_parameters,
        "full_params": full.trainable_parameters,
        "model_params": total,
        "lora_param_ratio": lora.trainable_parameters / full.trainable_parameters,
        "lora_s": lora.seconds,
        "full_s": full.seconds,
        "stale_s": stale.seconds,
        "scratch_s": scratch.seconds,
        "retrain_s": retrain.seconds,
        **{
            f"{name}_epochs": f"{result.best_epoch}/{len(result.history)}"
            for name, result in (("stale", stale), ("scratch", scratch), ("retrain", retrain))
        },
        "lora_best_epoch": lora.best_epoch,
        "full_best_epoch": full.best_epoch,
        "lora_history": lora.history,
        "full_history": full.history,
        "rows": {
            "pre_train": pre_train.height,
            "pre_valid": pre_valid.height,
            "pre_test": pre_test.height,
            "finetune_train": ft_train.height,
            "finetune_valid": ft_valid.height,
            "retrain_train": upto.height + ft_train.height,
            "post_drift_eval": after.height,
        },
        "ctr": {
            "pre_drift": float(pre.get_column("label").mean()),
            "drift_day": float(window.get_column("label").mean()),
            "post_drift": float(after.get_column("label").mean()),
        },
        "prepare_s": prepared_s,
        "seconds": time.perf_counter() - start,
    }
    return row


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--preset", default="default", help="models.ranker and features from it")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--impressions-per-day", type=int, default=20_000)
    parser.add_argument("--drift-day", type=int, default=6, help="days 0..D-1 are the old regime")
    parser.add_argument("--eval-days", type=int, default=2, help="new-regime days after D")
    parser.add_argument(
        "--strength", type=float, default=0.5, help="turn of preferences, π/2 units"
    )
    # One thread: on a shared machine a second OpenMP thread spins and made
    # training ~10x slower in CPU time here, not faster.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="config override, e.g. models.ranker.finetune.lora_rank=4",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    runs = []
    for seed in range(args.seeds):
        run = run_seed(args, seed)
        # Paired differences per seed, then the median (not a difference of medians).
        for name in ("lora", "full", "scratch", "retrain"):
            run[f"{name}_minus_stale_auc"] = run[f"{name}_auc"] - run["stale_auc"]
        run["lora_minus_full_auc"] = run["lora_auc"] - run["full_auc"]
        run["drift_damage_auc"] = run["stale_auc_no_drift"] - run["stale_auc"]
        run["lora_s_over_full_s"] = run["lora_s"] / run["full_s"]
        runs.append(run)
        print(f"seed {seed}: {run['seconds']:.0f} s", flush=True)
    median = {
        key: statistics.median(run[key] for run in runs)
        for key, value in runs[0].items()
        if isinstance(value, int | float) and key != "seed"
    }
    ranker = load_config(args.preset, args.set, environ={}).models.ranker
    results: dict[str, object] = {
        **median,
        "seeds": args.seeds,
        "world": world_config(args, 0).model_dump(mode="json", include=set(WORLD_KEYS)),
        "finetune": ranker.finetune.model_dump(mode="json"),
        "ranker": ranker.model_dump(mode="json", exclude={"tuning", "finetune"}),
        "per_seed": runs,
        "seconds": time.perf_counter() - start,
    }
    print_table(median, args, runs, time.perf_counter() - start)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


WORLD_KEYS = ("seed", "n_users", "n_items", "n_days", "impressions_per_day", "drifts")


def print_table(
    median: dict[str, float], args: argparse.Namespace, runs: list[dict[str, Any]], seconds: float
) -> None:
    print(
        f"\nconcept drift (strength {args.strength}) on day {args.drift_day}, scored on days "
        f"{args.drift_day + 1}..{args.drift_day + args.eval_days}; median of {args.seeds} seed(s)"
    )
    print(
        f"stale model: {median['pre_drift_auc']:.4f} on its own regime, "
        f"{median['stale_auc_no_drift']:.4f} on the same days had nothing changed"
    )
    print(
        f"{'model':<8} {'AUC':>7}  {'vs stale, paired: median [min, max]':<36} {'trainable':>10} {'s':>6}"
    )
    for name in MODELS:
        trainable = {"stale": "-", "lora": f"{runs[0]['lora_params']:,}"}.get(
            name, f"{runs[0]['full_params']:,}"
        )
        key = f"{name}_minus_stale_auc"
        deltas = [run[key] for run in runs] if name != "stale" else [0.0]
        paired = f"{median.get(key, 0.0):+.4f} [{min(deltas):+.4f}, {max(deltas):+.4f}]"
        print(
            f"{name:<8} {median[f'{name}_auc']:>7.4f}  {paired:<36} {trainable:>10} "
            f"{median[f'{name}_s']:>6.1f}"
        )
    gaps = [run["lora_minus_full_auc"] for run in runs]
    print(
        f"LoRA - full: {median['lora_minus_full_auc']:+.4f} [{min(gaps):+.4f}, {max(gaps):+.4f}]; "
        f"LoRA trains {median['lora_param_ratio']:.1%} of the parameters in "
        f"{median['lora_s_over_full_s']:.2f}x the wall time of full fine-tuning; run {seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
