"""Fine-tuning the reranker: LoRA trains adapters only and merges exactly; the window split."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest
import torch
from pydantic import ValidationError

from infra.config import RankerFinetuneConfig
from models.lora import LoRALinear
from models.moe import FeatureLayout, Reranker, RerankerConfig, SequenceColumn
from pipelines.ranker.finetune import add_adapters, finetune, lora_target, window_split
from serving.encoding import RankerPart
from serving.scoring import predict

LAYOUT = FeatureLayout(categorical=(11, 6), numeric=2, sequences=(SequenceColumn(shared_with=1),))
SMALL = RerankerConfig(
    tasks=("click",), embedding_dim=4, n_experts=3, top_k=2, expert_hidden=(8,), expert_dim=4
)
SETTINGS = RankerFinetuneConfig(lora_rank=2, lora_alpha=4.0, epochs=2, learning_rate=0.05)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _part(n: int, seed: int) -> RankerPart:
    """Label from the second column's value and the first numeric: learnable from scratch."""
    g = torch.Generator().manual_seed(seed)
    categorical = torch.stack(
        [torch.randint(1, 11, (n,), generator=g), torch.randint(1, 6, (n,), generator=g)], dim=1
    )
    numeric = torch.randn(n, 2, generator=g)
    effect = torch.tensor([0.0, -2.0, -1.0, 0.0, 1.0, 2.0])[categorical[:, 1]]
    labels = (effect + numeric[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).float()
    return RankerPart(
        categorical=categorical,
        numeric=numeric,
        sequences=(torch.randint(0, 6, (n, 3), generator=g),),
        labels=labels,
        users=categorical[:, 0].clone(),
    )


def _model(kind: str = "moe") -> Reranker:
    torch.manual_seed(0)
    config = RerankerConfig(**{**SMALL.__dict__, "kind": kind})
    return Reranker(LAYOUT, config)


def test_lora_trains_adapters_only_and_leaves_the_given_model_alone() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(model, _part(512, 1), _part(256, 2), SETTINGS, "lora", 64, merge=False)

    assert result.best_epoch >= 1  # otherwise the adapters would be back at zero
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    tuned = result.model
    adapters = [m for m in tuned.modules() if isinstance(m, LoRALinear)]
    assert result.adapted_layers == len(adapters) > 0
    assert any(a.lora_b.abs().sum() > 0 for a in adapters)
    # Every base weight (embeddings included) is exactly as it was: "x.base.y" was "x.y".
    for key, value in tuned.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, before[key.replace(".base.", ".")]), key
    assert torch.equal(tuned.embedder.table.weight, model.embedder.table.weight)
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    assert result.trainable_parameters == sum(
        p.numel() for p in tuned.parameters() if p.requires_grad
    )


def test_merged_model_scores_like_the_unmerged_one_with_the_base_architecture() -> None:
    model, train, valid = _model(), _part(512, 1), _part(256, 2)
    unmerged = finetune(model, train, valid, SETTINGS, "lora", 64, seed=3, merge=False)
    merged = finetune(model, train, valid, SETTINGS, "lora", 64, seed=3)

    assert not any(isinstance(m, LoRALinear) for m in merged.model.modules())
    assert merged.model.state_dict().keys() == model.state_dict().keys()
    fresh = Reranker(LAYOUT, model.config)
    fresh.load_state_dict(merged.model.state_dict())
    reference = predict(unmerged.model, valid)
    assert predict(merged.model, valid) == pytest.approx(reference, abs=1e-5)
    assert predict(fresh, valid) == pytest.approx(reference, abs=1e-5)
    assert merged.best_valid_auc > merged.base_valid_auc
    assert [row["epoch"] for row in merged.history] == [0, 1, 2]


def test_lora_trains_fewer_parameters_than_full_fine_tuning() -> None:
    model, train, valid = _model(), _part(256, 1), _part(128, 2)
    lora = finetune(model, train, valid, SETTINGS, "lora", 64)
    full = finetune(model, train, valid, SETTINGS, "full", 64, learning_rate=0.01)

    assert full.trainable_parameters == sum(p.numel() for p in model.parameters())
    assert 0 < lora.trainable_parameters < full.trainable_parameters
    assert lora.total_parameters == full.total_parameters  # merged: nothing added
    assert full.adapted_layers == 0


def test_targets_pick_their_layers_by_name() -> None:
    model = _model()
    settings = RankerFinetuneConfig(lora_rank=2, targets=("heads",))
    # One head Linear(expert_dim=4, 1): rank 2 · (4 + 1) adapter weights.
    assert add_adapters(model, settings) == 2 * (4 + 1)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["heads.click"]
    pick = lora_target(("experts", "gates"))
    assert pick("body.experts.0.net.0", torch.nn.Linear(1, 1))
    assert pick("body.gates.0.linear", torch.nn.Linear(1, 1))
    assert not pick("heads.click", torch.nn.Linear(1, 1))


def test_bad_targets_are_rejected_clearly() -> None:
    with pytest.raises(ValidationError):
        RankerFinetuneConfig(targets=("expert",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown LoRA targets \\['expert'\\]"):
        lora_target(("expert",))
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        lora_target(())
    # Valid names that the model lacks: a dense reranker has no gates.
    with pytest.raises(ValueError, match="match no linear layer of this 'dense' reranker"):
        add_adapters(_model("dense"), RankerFinetuneConfig(targets=("gates",)))
    with pytest.raises(ValueError, match="mode must be one of"):
        finetune(_model(), _part(8, 1), _part(8, 2), SETTINGS, "half")  # type: ignore[arg-type]


def test_window_split_cuts_whole_utc_days_from_the_newest() -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    hours = [0, 30, 47, 49, 71, 50]  # days 0, 1, 1, 2, 2, 2; order kept, not sorted
    frame = pl.DataFrame({"ts": [start + dt.timedelta(hours=h) for h in hours], "i": range(6)})

    before, window = window_split(frame, 1)
    assert window.get_column("i").to_list() == [3, 4, 5]
    assert before.get_column("i").to_list() == [0, 1, 2]
    before, window = window_split(frame, 2)
    assert window.get_column("i").to_list() == [1, 2, 3, 4, 5]
    assert window_split(frame, 5)[0].height == 0
    with pytest.raises(ValueError, match="window_days"):
        window_split(frame, 0)
    with pytest.raises(ValueError, match="'ts'"):
        window_split(frame.drop("ts"), 1)
    with pytest.raises(ValueError, match="datetime 'ts'"):
        window_split(frame.with_columns(pl.col("i").alias("ts")), 1)
