"""Reranker data building and the plain training loop, on tiny synthetic frames."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from infra.config import RankerConfig, SecondTaskConfig
from models.moe import RerankerConfig
from pipelines.ranker.data import ColumnSpec, encode_splits, prepare_ranker_data
from pipelines.ranker.encoded import target_stats
from pipelines.ranker.loop import (
    TrainConfig,
    configs_from,
    evaluate,
    new_reranker,
    second_task,
    task_report,
    train_epochs,
)
from serving.scoring import predict

SPEC = ColumnSpec(
    categorical=("user_id", "color"), numeric=("x",), sequences=("tags",), label="label"
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _frame(colors: list, xs: list, tags: list, users: list | None = None) -> pl.DataFrame:
    n = len(colors)
    return pl.DataFrame(
        {
            "user_id": users or list(range(n)),
            "color": colors,
            "x": xs,
            "tags": tags,
            "label": [i % 2 for i in range(n)],
        },
        schema_overrides={"x": pl.Float64, "tags": pl.List(pl.String)},
    )


def test_unseen_categories_map_to_zero_and_numeric_uses_train_statistics() -> None:
    train = _frame(
        ["red", "blue", "red", None], [1.0, 3.0, 5.0, None], [["a"], ["b", "a"], [], ["a"]]
    )
    valid = _frame(["green", "blue"], [3.0, 7.0], [["z"], ["b", "z"]], users=[0, 99])
    data = encode_splits(train, valid, valid, SPEC)

    # Vocabularies from train only, sorted: blue=1, red=2; rows = vocabulary + unknown.
    assert data.vocabularies["color"] == ["blue", "red"]
    assert data.layout.categorical == (5, 3)  # users 0..3 + unknown; 2 colours + unknown
    assert data.train.categorical[:, 1].tolist() == [2, 1, 2, 0]  # null -> 0
    assert data.valid.categorical[:, 1].tolist() == [0, 1]  # unseen "green" -> 0
    assert data.valid.categorical[:, 0].tolist() == [1, 0]  # unseen user 99 -> 0

    # Train x = 1, 3, 5 (null filled with the mean): mean 3, std sqrt(8/3).
    std = np.sqrt(8 / 3)
    assert data.numeric_stats["x"] == pytest.approx((3.0, std))
    assert data.train.numeric[:, 0].tolist() == pytest.approx([-2 / std, 0.0, 2 / std, 0.0])
    # Valid's own values (3, 7) never enter the statistics.
    assert data.valid.numeric[:, 0].tolist() == pytest.approx([0.0, 4 / std])

    # Sequences: tags a=1, b=2, padded to the longest training list (2); unseen "z" -> 0.
    assert data.train.sequences[0].tolist() == [[1, 0], [2, 1], [0, 0], [1, 0]]
    assert data.valid.sequences[0].tolist() == [[0, 0], [2, 0]]
    assert data.layout.sequences[0].rows == 3
    assert data.valid.users.tolist() == [0, 99]


def _synthetic(n: int, seed: int) -> pl.DataFrame:
    """Label from a colour effect and x plus noise: learnable, AUC of the truth ~0.9."""
    rng = np.random.default_rng(seed)
    colors = rng.integers(0, 6, n)
    x = rng.normal(size=n)
    effect = np.array([-1.5, -1.0, 0.0, 0.5, 1.0, 1.5])[colors]
    label = (effect + x + rng.normal(scale=0.7, size=n) > 0).astype(np.float64)
    return pl.DataFrame(
        {
            "user_id": rng.integers(0, 30, n),
            "color": [f"c{c}" for c in colors],
            "x": x,
            "tags": [[f"t{c}"] for c in rng.integers(0, 4, n)],
            "label": label,
        }
    )


@pytest.mark.parametrize("kind", ["logistic", "dense", "moe"])
def test_train_epochs_learns_a_synthetic_signal(kind: str) -> None:
    data = prepare_ranker_data(_synthetic(3000, seed=1), SPEC, seed=0)
    assert (len(data.train), len(data.valid), len(data.test)) == (2400, 300, 300)
    config = RerankerConfig(
        kind=kind, tasks=("click",), embedding_dim=4, n_experts=4, expert_hidden=(16,), expert_dim=8
    )
    result = train_epochs(config, TrainConfig(epochs=6, batch_size=128, lr=0.01), data)
    report = evaluate(result.model, data.test)
    assert report["auc"] > 0.7
    assert predict(result.model, data.test).shape == (300,)


def test_early_stopping_keeps_the_best_epoch() -> None:
    data = prepare_ranker_data(_synthetic(1500, seed=2), SPEC, seed=0)
    config = RerankerConfig(kind="dense", tasks=("click",), embedding_dim=4, expert_dim=8)
    # A large lr makes validation AUC wander, so stopping and restoring both happen.
    train = TrainConfig(epochs=8, patience=2, batch_size=64, lr=0.05, seed=3)
    result = train_epochs(config, train, data)
    aucs = [h["valid_auc"] for h in result.history]
    best = int(np.argmax(aucs))
    assert result.best_epoch == best + 1
    assert result.best_valid_auc == pytest.approx(max(aucs))
    # Stopped after `patience` epochs without improvement, or ran out of epochs.
    assert len(aucs) == train.epochs or len(aucs) - result.best_epoch == train.patience
    # The returned model is the best epoch's: its validation AUC is the recorded one.
    assert evaluate(result.model, data.valid)["auc"] == pytest.approx(max(aucs))


def _with_rating(data, seed: int, share: float = 0.4):
    """``data`` whose parts carry a ``rating`` target (1..5, rises with x) on a ``share`` of rows."""
    rng = np.random.default_rng(seed)

    def part(p):
        x = p.numeric[:, 0].numpy()
        rating = np.clip(np.round(3.0 + 1.2 * x + rng.normal(scale=0.3, size=x.size)), 1, 5)
        rating[rng.random(x.size) >= share] = np.nan
        return dataclasses.replace(
            p, targets={"rating": torch.from_numpy(rating.astype(np.float32))}
        )

    return dataclasses.replace(
        data, train=part(data.train), valid=part(data.valid), test=part(data.test)
    )


SMALL = dict(embedding_dim=4, n_experts=4, expert_hidden=(16,), expert_dim=8, epochs=6,
             batch_size=128, learning_rate=0.01)  # fmt: skip


def test_a_second_task_learns_its_target_on_the_rows_that_have_one() -> None:
    data = _with_rating(prepare_ranker_data(_synthetic(3000, seed=1), SPEC, seed=0), seed=4)
    model_config, loop = configs_from(RankerConfig(**SMALL), target_stats(data.train))
    assert model_config.tasks == ("click", "rating")
    assert [t.kind for t in loop.tasks] == ["binary", "regression"]
    result = train_epochs(model_config, loop, data)
    # NaN targets of the unrated rows never reach the loss.
    assert all(np.isfinite(row["train_loss"]) for row in result.history)
    assert "valid_rating_rmse" in result.history[-1]
    report = task_report(result.model, data.test, loop.tasks[1])
    assert report["n"] == int((~torch.isnan(data.test.targets["rating"])).sum())
    assert report["rmse"] < 0.7 * report["baseline_rmse"]
    assert evaluate(result.model, data.test)["auc"] > 0.7


def test_a_binary_second_task_learns_value_over_its_threshold() -> None:
    data = _with_rating(prepare_ranker_data(_synthetic(3000, seed=1), SPEC, seed=0), seed=5)
    settings = RankerConfig(
        **SMALL, second_task=SecondTaskConfig(kind="binary", threshold=4.0, weight=1.0)
    )
    model_config, loop = configs_from(settings, target_stats(data.train))
    assert loop.tasks[1].threshold == 4.0
    result = train_epochs(model_config, loop, data)
    assert task_report(result.model, data.test, loop.tasks[1])["auc"] > 0.8


def test_the_second_task_is_left_out_with_a_reason() -> None:
    data = prepare_ranker_data(_synthetic(600, seed=1), SPEC, seed=0)
    assert second_task(RankerConfig(), target_stats(data.train)) == (
        None, "the examples have no 'rating' column"
    )  # fmt: skip
    assert second_task(RankerConfig(second_task=None), target_stats(data.train))[0] is None
    rated = _with_rating(data, seed=0, share=0.05)
    spec, why = second_task(RankerConfig(), target_stats(rated.train))
    assert spec is None and "fewer than min_rows=100" in why
    # Without the training part the model is the click model alone.
    assert configs_from(RankerConfig())[0].tasks == ("click",)


def test_regression_heads_start_at_the_training_mean() -> None:
    data = _with_rating(prepare_ranker_data(_synthetic(600, seed=1), SPEC, seed=0), seed=0)
    model_config, loop = configs_from(RankerConfig(**SMALL), target_stats(data.train))
    model = new_reranker(data.layout, model_config, loop, target_stats(data.train))
    values = data.train.targets["rating"]
    assert float(model.heads["rating"].bias.detach()) == pytest.approx(
        float(values[~torch.isnan(values)].mean())
    )
