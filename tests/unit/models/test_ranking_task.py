"""The ranking task: per-task BCE / MSE, masks, weights, aux loss, gradients to the reranker."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from models.moe import FeatureBatch, FeatureLayout, Reranker, RerankerConfig, RerankerOutput
from models.ranking_task import RankingTask, TaskSpec


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny layers train faster on one thread, and the CI machines are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _output(click: list[float], rating: list[float], aux: float = 0.0) -> RerankerOutput:
    return RerankerOutput(
        {"click": torch.tensor(click), "rating": torch.tensor(rating)}, torch.tensor(aux)
    )


def test_binary_loss_matches_bce_by_hand_and_torch() -> None:
    task = RankingTask([TaskSpec("click")])
    out = task(_output([0.0, 2.0], [0.0, 0.0]), {"click": torch.tensor([1.0, 0.0])})
    # -log σ(0) = log 2; -log(1 - σ(2)) = log(1 + e^2).
    expected = (math.log(2) + math.log(1 + math.e**2)) / 2
    assert out.per_task == {"click": pytest.approx(expected)}
    torch_bce = F.binary_cross_entropy_with_logits(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0]))
    assert float(out.total) == pytest.approx(float(torch_bce))


def test_pos_weight_scales_the_positive_rows() -> None:
    task = RankingTask([TaskSpec("click", pos_weight=3.0)])
    out = task(_output([0.0, 0.0], [0.0, 0.0]), {"click": torch.tensor([1.0, 0.0])})
    assert float(out.total) == pytest.approx((3 * math.log(2) + math.log(2)) / 2)


def test_regression_mask_excludes_rows_even_with_nan_targets() -> None:
    task = RankingTask([TaskSpec("rating", kind="regression")])
    output = _output([0.0] * 3, [4.0, 1.0, 3.0])
    output.outputs["rating"].requires_grad_(True)
    targets = {"rating": torch.tensor([5.0, float("nan"), 1.0])}
    loss = task(output, targets, masks={"rating": torch.tensor([True, False, True])})
    assert loss.per_task["rating"] == pytest.approx((1.0 + 4.0) / 2)
    loss.total.backward()
    grad = output.outputs["rating"].grad
    assert grad is not None and torch.isfinite(grad).all() and grad[1] == 0
    # No row has a target: 0, not NaN.
    none = task(output, targets, masks={"rating": torch.zeros(3, dtype=torch.bool)})
    assert none.per_task["rating"] == 0.0


def test_weights_combine_and_the_aux_loss_is_added() -> None:
    task = RankingTask(
        [TaskSpec("click", weight=1.0), TaskSpec("rating", kind="regression", weight=0.5)]
    )
    out = task(
        _output([0.0, 0.0], [2.0, 2.0], aux=0.25),
        {"click": torch.tensor([1.0, 0.0]), "rating": torch.tensor([4.0, 4.0])},
    )
    assert out.per_task["click"] == pytest.approx(math.log(2))
    assert out.per_task["rating"] == pytest.approx(4.0)
    assert out.aux == 0.25
    assert float(out.total) == pytest.approx(math.log(2) + 0.5 * 4.0 + 0.25)


def test_errors_name_the_bad_field() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        TaskSpec("click", kind="poisson")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pos_weight is for binary"):
        TaskSpec("rating", kind="regression", pos_weight=2.0)
    with pytest.raises(ValueError, match="weight of task 'click'"):
        TaskSpec("click", weight=-1.0)
    with pytest.raises(ValueError, match="unique names"):
        RankingTask([TaskSpec("click"), TaskSpec("click")])
    task = RankingTask([TaskSpec("click")])
    with pytest.raises(ValueError, match="targets has no entry for task 'click'"):
        task(_output([0.0], [0.0]), {})
    with pytest.raises(ValueError, match="not among the model's outputs"):
        RankingTask([TaskSpec("watch")])(_output([0.0], [0.0]), {"watch": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"targets\['click'\] must have shape"):
        task(_output([0.0], [0.0]), {"click": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"masks\['click'\] must be bool"):
        task(_output([0.0], [0.0]), {"click": torch.zeros(1)}, {"click": torch.ones(1)})


def test_gradient_reaches_a_tiny_reranker_and_training_lowers_the_loss() -> None:
    torch.manual_seed(0)
    layout = FeatureLayout(categorical=(5,), numeric=2)
    config = RerankerConfig(
        embedding_dim=4,
        n_experts=4,
        top_k=2,
        expert_hidden=(8,),
        expert_dim=8,
        sparse_embeddings=False,
    )
    model = Reranker(layout, config)
    g = torch.Generator().manual_seed(1)
    b = 64
    batch = FeatureBatch(
        categorical=torch.randint(1, 5, (b, 1), generator=g), numeric=torch.randn(b, 2, generator=g)
    )
    click = (batch.numeric[:, 0] > 0).float()
    rating = 3.0 + batch.numeric[:, 1]
    targets = {"click": click, "rating": rating}
    masks = {"rating": click.bool()}  # ratings exist for clicked rows only
    task = RankingTask([TaskSpec("click"), TaskSpec("rating", kind="regression", weight=0.5)])

    loss = task(model(batch), targets, masks)
    loss.total.backward()
    assert model.heads["click"].weight.grad is not None
    assert model.heads["rating"].weight.grad.abs().sum() > 0  # type: ignore[union-attr]
    assert model.embedder.table.weight.grad.abs().sum() > 0  # type: ignore[union-attr]

    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    first = float(loss.total.detach())
    for _ in range(40):
        optimizer.zero_grad()
        task(model(batch), targets, masks).total.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert float(task(model(batch), targets, masks).total) < 0.5 * first
