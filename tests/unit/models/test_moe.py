"""The MoE reranker: embedder, sparse routing, capacity, aux loss and the baselines."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.moe import (
    HASH_INCREMENT,
    HASH_MULTIPLIER,
    HASH_PRIME,
    FeatureBatch,
    FeatureEmbedder,
    FeatureLayout,
    Reranker,
    RerankerConfig,
    SequenceColumn,
    SparseMoE,
    active_parameters,
    expert_capacity,
    field_interactions,
    hash_buckets,
    load_balancing_loss,
    moe_active_parameters,
    within_capacity,
)
from models.optimizers import SparseDenseAdam

LAYOUT = FeatureLayout(
    categorical=(6, 9),
    hashed=(13,),
    numeric=3,
    sequences=(SequenceColumn(shared_with=1), SequenceColumn(rows=7)),
)


def _batch(b: int, seed: int = 0) -> FeatureBatch:
    g = torch.Generator().manual_seed(seed)
    return FeatureBatch(
        categorical=torch.randint(0, 9, (b, 2), generator=g),
        hashed=torch.randint(-(2**40), 2**40, (b, 1), generator=g),
        numeric=torch.randn(b, 3, generator=g),
        sequences=(
            torch.randint(0, 9, (b, 5), generator=g),
            torch.randint(0, 7, (b, 3), generator=g),
        ),
    )


def _config(**overrides: object) -> RerankerConfig:
    base: dict[str, object] = dict(
        embedding_dim=4, n_experts=4, top_k=2, expert_hidden=(16,), expert_dim=8
    )
    return RerankerConfig(**{**base, **overrides})  # type: ignore[arg-type]


def _moe(in_dim: int = 5, **overrides: object) -> SparseMoE:
    return SparseMoE(in_dim, _config(**overrides))


def _force_gate(moe: SparseMoE, task: int, bias: list[float]) -> None:
    """Make gate ``task`` ignore its input: every token gets logits ``bias``."""
    with torch.no_grad():
        moe.gates[task].linear.weight.zero_()
        moe.gates[task].linear.bias.copy_(torch.tensor(bias))


def _grad_norm(parameter: torch.Tensor) -> float:
    """0 for a parameter no gradient reached (grad None) or a zero gradient."""
    return 0.0 if parameter.grad is None else float(parameter.grad.abs().sum())


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny layers train faster on one thread, and the CI machines are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["moe", "dense", "logistic"])
def test_every_kind_gives_one_score_per_row_and_task(kind: str) -> None:
    torch.manual_seed(0)
    model = Reranker(LAYOUT, _config(kind=kind))
    out = model(_batch(10))
    # 2 categorical + 1 hashed + 2 sequences, 4 wide, + 3 numeric.
    assert model.embedder.out_dim == 5 * 4 + 3
    assert set(out.outputs) == {"click", "rating"}
    assert all(score.shape == (10,) for score in out.outputs.values())
    assert out.aux_loss.shape == ()
    assert (out.routing is not None) == (kind == "moe")


def test_unknown_ids_share_the_unknown_row_and_sequences_pool_their_ids() -> None:
    torch.manual_seed(0)
    embedder = FeatureEmbedder(LAYOUT, 4, sparse=False)
    table = embedder.table.weight
    batch = FeatureBatch(
        categorical=torch.tensor([[0, 3], [5, 3], [6, -1], [-2, 99]]),  # 6 is past column 0's rows
        hashed=torch.tensor([[7], [7], [2**62], [-5]]),
        numeric=torch.zeros(4, 3),
        sequences=(
            torch.tensor([[2, 4, 0, 0, 0], [0, 0, 0, 0, 0], [4, 2, 99, 0, 0], [8, 8, 1, 0, 0]]),
            torch.tensor([[1, 0, 0], [0, 0, 0], [6, 6, 0], [0, 0, 3]]),
        ),
    )
    out = embedder(batch).detach()
    cat0, cat1, hashed, seq0, seq1 = out[:, :20].split(4, dim=1)
    # Column 0 rows 0-5 and column 1 rows 6-14 of the table; unknowns read row 0 of their block.
    assert torch.equal(cat0[2], table[0]) and torch.equal(cat0[3], table[0])
    assert torch.equal(cat1[2], table[6]) and torch.equal(cat1[3], table[6])
    assert torch.equal(cat0[1], table[5]) and torch.equal(cat1[0], table[6 + 3])
    assert torch.equal(hashed[0], hashed[1])  # equal raw values, equal bucket
    # The first sequence reuses column 1's rows; padding and out-of-range ids are skipped.
    assert torch.allclose(seq0[0], (table[6 + 2] + table[6 + 4]) / 2)
    assert torch.allclose(seq0[2], seq0[0])
    assert torch.allclose(seq0[3], (2 * table[6 + 8] + table[6 + 1]) / 3)
    assert torch.equal(seq0[1], torch.zeros(4))
    # The second has its own block after the hashed one (6 + 9 + 13 = 28).
    assert torch.allclose(seq1[0], table[28 + 1]) and torch.allclose(seq1[2], table[28 + 6])
    assert torch.equal(out[:, 20:], torch.zeros(4, 3))


def _per_column_lookup(
    embedder: FeatureEmbedder, batch: FeatureBatch, table: torch.Tensor
) -> torch.Tensor:
    """The embedder's output computed one column at a time (a plain lookup or a masked mean)."""
    layout, columns = embedder.layout, []
    offsets = embedder.categorical_offsets.tolist()
    for c, rows in enumerate(layout.categorical):
        ids = batch.categorical[:, c]
        known = (ids > 0) & (ids < rows)
        columns.append(table[torch.where(known, ids, 0) + offsets[c]])
    for h, buckets in enumerate(layout.hashed):
        rows = hash_buckets(batch.hashed[:, h], buckets) + int(embedder.hashed_offsets[h])
        columns.append(table[rows])
    for ids, (offset, rows) in zip(batch.sequences, embedder.sequence_blocks, strict=True):
        keep = ((ids > 0) & (ids < rows)).float()
        vectors = table[torch.where(keep.bool(), ids, 0) + offset]  # (B, L, D)
        columns.append((vectors * keep.unsqueeze(2)).sum(1) / keep.sum(1, keepdim=True).clamp(1))
    return torch.cat([*columns, batch.numeric], dim=1)


def test_one_bag_lookup_equals_per_column_lookups_with_one_sparse_gradient() -> None:
    torch.manual_seed(0)
    embedder = FeatureEmbedder(LAYOUT, 4)
    batch = _batch(16, seed=3)
    table = embedder.table.weight.detach().clone().requires_grad_()
    weights = torch.randn(embedder.out_dim)
    out = embedder(batch)
    expected = _per_column_lookup(embedder, batch, table)
    assert torch.allclose(out, expected, atol=1e-6)
    (out @ weights).sum().backward()
    (expected @ weights).sum().backward()
    grad = embedder.table.weight.grad
    assert grad.is_sparse  # a single sparse gradient: no sparse + sparse addition
    assert torch.allclose(grad.to_dense(), table.grad, atol=1e-6)
    # Lazy Adam moves the rows present in the gradient: exactly the rows looked
    # up, padding rows of the sequences included (as with per-column lookups).
    looked_up = {int(r) for r in torch.nonzero(table.grad.abs().sum(1)).flatten()}
    present = set(grad.coalesce().indices()[0].tolist())
    assert looked_up <= present
    sequence_pads = {offset for offset, _ in embedder.sequence_blocks}
    assert present - looked_up <= sequence_pads


def test_layouts_without_embedded_or_numeric_columns() -> None:
    numeric_only = FeatureEmbedder(FeatureLayout(numeric=2), 4)
    values = torch.randn(3, 2)
    assert torch.equal(numeric_only(FeatureBatch(numeric=values)), values)
    sequences_only = FeatureEmbedder(FeatureLayout(sequences=(SequenceColumn(rows=5),)), 4)
    ids = torch.tensor([[1, 2], [0, 0], [4, 0]])
    out = sequences_only(FeatureBatch(sequences=(ids,)))
    table = sequences_only.table.weight.detach()
    assert out.shape == (3, 4)
    assert torch.allclose(out[0], (table[1] + table[2]) / 2) and torch.equal(out[1], torch.zeros(4))


def test_hash_is_the_documented_formula_and_spreads_consecutive_ids() -> None:
    raw = torch.tensor([0, 1, -1, 2**62])
    got = hash_buckets(raw, 1000)
    assert int(got[0]) == HASH_INCREMENT % 1000
    assert int(got[1]) == (HASH_MULTIPLIER + HASH_INCREMENT) % HASH_PRIME % 1000
    assert bool(((got >= 0) & (got < 1000)).all())
    counts = torch.bincount(hash_buckets(torch.arange(10_000), 100), minlength=100)
    assert int(counts.min()) >= 50 and int(counts.max()) <= 150


def test_the_batch_must_match_the_layout() -> None:
    embedder = FeatureEmbedder(LAYOUT, 4)
    batch = _batch(3)
    with pytest.raises(ValueError, match=r"batch\.categorical must be \(B, 2\)"):
        embedder(
            FeatureBatch(batch.categorical[:, :1], batch.hashed, batch.numeric, batch.sequences)
        )
    with pytest.raises(ValueError, match="sequences"):
        embedder(FeatureBatch(batch.categorical, batch.hashed, batch.numeric, batch.sequences[:1]))


@pytest.mark.parametrize("training", [True, False])
def test_top_k_routing_runs_exactly_k_distinct_experts_per_token(training: bool) -> None:
    torch.manual_seed(0)
    # One task, capacity B (factor E / k): nothing is dropped.
    moe = _moe(in_dim=5, n_experts=6, top_k=2, tasks=("click",), capacity_factor=3.0)
    moe.train(training)
    tokens_seen = []
    for expert in moe.experts:
        expert.register_forward_hook(lambda _m, args, _o: tokens_seen.append(args[0].shape[0]))
    out = moe(torch.randn(40, 5))
    routing = out.routing
    assert routing is not None and routing.experts.shape == (1, 40, 2)
    assert bool((routing.experts[0, :, 0] != routing.experts[0, :, 1]).all())
    assert bool(routing.kept.all())
    assert torch.allclose(routing.weights.sum(dim=2), torch.ones(1, 40))
    assert sum(tokens_seen) == 40 * 2  # sparse: B·k expert rows computed, not B·E
    assert out.representations.shape == (1, 40, 8)


def test_within_capacity_keeps_first_choices_first() -> None:
    experts = torch.tensor([[0, 1], [0, 2], [0, 1]])
    # Expert 0 holds 2: tokens 0 and 1 (first choices); token 2 keeps only its second choice.
    kept = within_capacity(experts, n_experts=3, capacity=2)
    assert kept.tolist() == [[True, True], [True, True], [False, True]]
    assert expert_capacity(16, 2, 4, 1.0) == 8
    assert expert_capacity(10, 1, 4, 1.25) == 4  # ceil(3.125)


def test_capacity_drops_overflow_in_training_and_renormalises_the_rest() -> None:
    torch.manual_seed(0)
    moe = _moe(in_dim=5, n_experts=4, top_k=2, tasks=("click",), capacity_factor=1.0, gate_noise=0)
    _force_gate(moe, 0, [10.0, 5.0, 0.0, 0.0])  # every token: expert 0 first, then 1
    x = torch.randn(16, 5)
    out = moe(x)  # capacity ceil(16 · 2 / 4) = 8 per expert
    kept = out.routing.kept[0]
    assert kept[:8].all() and not kept[8:].any()
    assert torch.equal(out.representations[0, 8:], torch.zeros(8, 8))  # both routes dropped
    assert torch.allclose(out.routing.weights[0, :8].sum(dim=1), torch.ones(8))
    # Tokens e0, e0, e1: the first two pick experts (0, 1), the third (0, 2).
    with torch.no_grad():
        moe.gates[0].linear.weight[:, 0] = torch.tensor([10.0, 5.0, 0.0, 0.0])
        moe.gates[0].linear.weight[:, 1] = torch.tensor([10.0, 0.0, 5.0, 0.0])
        moe.gates[0].linear.bias.zero_()
    three = torch.eye(5)[[0, 0, 1]]
    out = moe(three)  # capacity ceil(3 · 2 / 4) = 2: token 2 loses expert 0, keeps expert 2
    assert out.routing.kept[0].tolist() == [[True, True], [True, True], [False, True]]
    assert out.routing.weights[0, 2].tolist() == [0.0, 1.0]  # the survivor carries it all
    expected = moe.experts[2](three[2:])[0]
    assert torch.allclose(out.representations[0, 2], expected, atol=1e-6)
    # Evaluation drops nothing: a row's score never depends on its batch.
    moe.eval()
    assert bool(moe(x).routing.kept.all())


def test_sparse_dispatch_equals_every_expert_on_every_token() -> None:
    """The gathered, per-expert computation against a brute-force mixture, gradients included."""
    torch.manual_seed(0)
    moe = _moe(in_dim=5, n_experts=4, top_k=2, capacity_factor=0.6)  # two tasks, drops
    x = torch.randn(24, 5, requires_grad=True)
    out = moe(x)
    routing = out.routing
    assert not bool(routing.kept.all())
    every = torch.stack([expert(x) for expert in moe.experts], dim=1)  # (B, E, D)
    chosen = every[torch.arange(24).view(1, 24, 1), routing.experts]  # (T, B, k, D)
    expected = (chosen * routing.weights.unsqueeze(-1)).sum(dim=2)
    assert torch.allclose(out.representations, expected, atol=1e-6)
    probe = torch.randn_like(expected)
    # The gates are shared by both graphs: keep them for the second pass.
    (grad_sparse,) = torch.autograd.grad((out.representations * probe).sum(), x, retain_graph=True)
    (grad_dense,) = torch.autograd.grad((expected * probe).sum(), x)
    assert torch.allclose(grad_sparse, grad_dense, atol=1e-6)


def test_aux_loss_is_one_for_uniform_gates_and_large_for_collapsed_ones() -> None:
    moe = _moe(in_dim=5, n_experts=4, top_k=1, tasks=("click",), aux_loss_weight=0.5)
    moe.eval()
    x = torch.randn(32, 5)
    _force_gate(moe, 0, [0.0, 0.0, 0.0, 0.0])
    assert float(moe(x).aux_loss.detach()) == pytest.approx(0.5 * 1.0, rel=1e-6)
    _force_gate(moe, 0, [30.0, 0.0, 0.0, 0.0])
    assert float(moe(x).aux_loss.detach()) == pytest.approx(0.5 * 4.0, rel=1e-4)  # E when collapsed
    # By hand: routes (0, 0, 1, 1) so f = (1/2, 1/2, 0); P = (0.5, 0.3, 0.2): 3 · 0.4 = 1.2.
    probs = torch.tensor([[0.5, 0.3, 0.2]]).repeat(4, 1)
    routed = torch.tensor([[0], [0], [1], [1]])
    assert float(load_balancing_loss(routed, probs)) == pytest.approx(1.2, rel=1e-6)


def test_gradients_reach_only_the_routed_experts() -> None:
    torch.manual_seed(0)
    moe = _moe(in_dim=5, n_experts=8, top_k=1, tasks=("click",), capacity_factor=8.0)
    out = moe(torch.randn(3, 5))  # three tokens, one expert each: at most 3 of 8 experts
    out.representations.sum().backward()
    routed = set(out.routing.experts[out.routing.kept].tolist())
    with_grad = {e for e, expert in enumerate(moe.experts) if _grad_norm(expert.net[0].weight)}
    assert with_grad == routed and len(routed) < 8


def test_gate_noise_is_applied_in_training_only() -> None:
    torch.manual_seed(0)
    moe = _moe(in_dim=5, n_experts=8, top_k=2, gate_noise=1.0, capacity_factor=4.0)
    x = torch.randn(64, 5)
    moe.eval()
    a, b = moe(x), moe(x)
    assert torch.equal(a.representations, b.representations)
    moe.train()
    c, d = moe(x), moe(x)
    assert not torch.equal(c.routing.experts, d.routing.experts)
    quiet = _moe(in_dim=5, n_experts=8, top_k=2, gate_noise=0.0, capacity_factor=4.0)
    assert torch.equal(quiet(x).representations, quiet(x).representations)


def test_eval_scores_do_not_depend_on_the_rest_of_the_batch() -> None:
    torch.manual_seed(0)
    model = Reranker(LAYOUT, _config(capacity_factor=0.1))  # tiny capacity: drops in training
    model.eval()
    batch = _batch(32)
    alone = FeatureBatch(
        batch.categorical[:1],
        batch.hashed[:1],
        batch.numeric[:1],
        tuple(s[:1] for s in batch.sequences),
    )
    with torch.no_grad():
        together, single = model(batch), model(alone)
    for task in ("click", "rating"):
        assert torch.allclose(together.outputs[task][:1], single.outputs[task], atol=1e-6)


def test_each_task_has_its_own_gate_over_shared_experts() -> None:
    torch.manual_seed(0)
    moe = _moe(in_dim=5, n_experts=4, top_k=2, gate_noise=0.0, capacity_factor=2.0)
    assert moe.gates[0].linear.weight is not moe.gates[1].linear.weight
    _force_gate(moe, 0, [5.0, 5.0, 0.0, 0.0])  # click: experts 0, 1
    _force_gate(moe, 1, [0.0, 0.0, 5.0, 5.0])  # rating: experts 2, 3
    out = moe(torch.randn(8, 5))
    assert not torch.allclose(out.representations[0], out.representations[1])
    # The click loss trains the click gate and the click experts only.
    out.representations[0].sum().backward()
    assert _grad_norm(moe.gates[0].linear.weight) > 0
    assert _grad_norm(moe.gates[1].linear.weight) == 0
    assert _grad_norm(moe.experts[0].net[0].weight) > 0
    assert _grad_norm(moe.experts[2].net[0].weight) == 0  # computed for rating, unused by click


@pytest.mark.parametrize(
    ("n_experts", "top_k", "hidden"),
    [(8, 2, (128,)), (4, 1, (64, 32)), (16, 4, (32,)), (8, 2, ())],
)
def test_dense_baseline_has_the_moes_active_parameters(
    n_experts: int, top_k: int, hidden: tuple[int, ...]
) -> None:
    config = _config(n_experts=n_experts, top_k=top_k, expert_hidden=hidden, expert_dim=32)
    moe = Reranker(LAYOUT, config)
    dense = Reranker(LAYOUT, dataclasses.replace(config, kind="dense"))
    moe_active, dense_active = active_parameters(moe), active_parameters(dense)
    assert abs(dense_active - moe_active) <= 0.1 * moe_active
    # The dense MLP really is that size (every body parameter is active).
    body = sum(p.numel() for p in dense.body.parameters())
    heads = sum(p.numel() for p in dense.heads.parameters())
    assert dense_active == body + heads
    # And the MoE's total is larger than its active part: E experts, k used.
    assert sum(p.numel() for p in moe.body.parameters()) > moe_active_parameters(
        moe.embedder.out_dim, config
    )


def test_logistic_kind_is_a_linear_model_of_the_embedded_features() -> None:
    model = Reranker(LAYOUT, _config(kind="logistic"))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2  # the two heads
    assert all(m.in_features == model.embedder.out_dim and m.out_features == 1 for m in linears)
    assert active_parameters(model) == 2 * (model.embedder.out_dim + 1)
    assert sum(p.numel() for p in model.body.parameters()) == 0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"kind": "tree"}, "kind"),
        ({"top_k": 5}, "top_k"),
        ({"tasks": ("click", "click")}, "tasks"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"gate_noise": -1.0}, "gate_noise"),
        ({"dropout": 1.0}, "dropout"),
        ({"expert_hidden": (0,)}, "expert_hidden"),
    ],
)
def test_config_names_the_bad_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        _config(**overrides)


def test_layout_names_the_bad_field() -> None:
    with pytest.raises(ValueError, match="shared_with"):
        FeatureLayout(categorical=(5,), sequences=(SequenceColumn(shared_with=1),))
    with pytest.raises(ValueError, match="categorical"):
        FeatureLayout(categorical=(1,))
    with pytest.raises(ValueError, match="exactly one"):
        SequenceColumn(rows=5, shared_with=0)


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann-Whitney AUC: the share of (positive, negative) pairs ranked correctly."""
    ranks = scores.argsort().argsort().double() + 1
    positive = labels.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _interaction_data(n: int, seed: int) -> tuple[FeatureBatch, torch.Tensor]:
    """Click iff two categorical values have the same parity (10% labels flipped), plus noise."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(1, 9, (n,), generator=g), torch.randint(1, 9, (n,), generator=g)
    label = ((a + b) % 2 == 0).float()
    flip = torch.rand(n, generator=g) < 0.1
    label = torch.where(flip, 1 - label, label)
    batch = FeatureBatch(categorical=torch.stack([a, b], 1), numeric=torch.randn(n, 1, generator=g))
    return batch, label


def _train(model: Reranker, steps: int) -> float:
    """Fit the click head on the interaction data; test AUC."""
    train, labels = _interaction_data(steps * 128, seed=1)
    optimizer = SparseDenseAdam(model, lr=0.02)
    model.train()
    for step in range(steps):
        rows = slice(step * 128, (step + 1) * 128)
        batch = FeatureBatch(categorical=train.categorical[rows], numeric=train.numeric[rows])
        out = model(batch)
        loss = F.binary_cross_entropy_with_logits(out.outputs["click"], labels[rows]) + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test, test_labels = _interaction_data(4000, seed=2)
    model.eval()
    with torch.no_grad():
        return _auc(model(test).outputs["click"], test_labels)


@pytest.mark.usefixtures("one_thread")
def test_moe_learns_an_interaction_that_logistic_regression_cannot() -> None:
    torch.manual_seed(0)
    layout = FeatureLayout(categorical=(9, 9), numeric=1)
    config = _config(n_experts=4, top_k=2, expert_hidden=(32,), embedding_dim=8)
    moe_auc = _train(Reranker(layout, config), steps=300)
    logistic_auc = _train(Reranker(layout, _config(kind="logistic", embedding_dim=8)), steps=100)
    # Ceiling with 10% of labels flipped: 0.9 · 0.9 + ½ (0.9 · 0.1 + 0.1 · 0.9) = 0.9.
    assert moe_auc > 0.75, moe_auc
    assert logistic_auc < 0.6, logistic_auc


def test_field_interactions_are_the_sum_over_field_pairs() -> None:
    torch.manual_seed(0)
    features = torch.randn(3, 4 * 5 + 2)  # 4 fields of width 5, then 2 numeric columns
    fields = features[:, :20].view(3, 4, 5)
    brute = sum(fields[:, i] * fields[:, j] for i in range(4) for j in range(i + 1, 4))
    assert torch.allclose(field_interactions(features, 4, 5), brute, atol=1e-5)


def test_the_interaction_term_is_added_to_every_task_score() -> None:
    torch.manual_seed(0)
    model = Reranker(LAYOUT, _config(kind="dense", field_interactions=True))
    model.eval()
    batch = _batch(6)
    with_pairs = model(batch).outputs
    heads = model.interaction_heads
    assert heads is not None and set(heads) == {"click", "rating"}
    for head in heads.values():
        nn.init.zeros_(head.weight)
    without = model(batch).outputs
    for task in ("click", "rating"):
        assert not torch.allclose(with_pairs[task], without[task])
