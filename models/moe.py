"""The Mixture-of-Experts reranker: features -> sparse MoE (or a baseline) -> one head per task.

Composed from small named parts (shapes in the docstrings)::

    FeatureBatch ─► FeatureEmbedder ─► (B, F) ─► body ─► (T, B, D) ─► one head per task ─► T × (B,)
                                                  │
                    kind "moe":       SparseMoE: per-task noisy top-k gates over E shared experts
                    kind "dense":     DenseBlock: one shared MLP with the MoE's active compute
                    kind "logistic":  LinearBlock: the embedded features as they are (F = D)

``T`` is the number of tasks (``("click", "rating")`` by default). Heads are
linear and return raw scores: whether a task's score is a logit (click) or a
regression (rating) is the business of the task object that owns its loss,
not of the network. The baselines run the same code path, so an ablation
changes one config field.

Routing is data-dependent (top-k, capacity, per-expert token lists) and stays
plain eager torch: ``torch.export`` (MLflow's pt2 flavour) cannot trace it;
models are saved as state dicts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.two_tower import mlp

Kind = Literal["moe", "dense", "logistic"]
KINDS: tuple[Kind, ...] = ("moe", "dense", "logistic")

# Padding / unknown row of every vocabulary column (and of sequences).
PAD = 0

# Hash of raw int64 values into buckets: fold the high half into the low one,
# reduce modulo the Mersenne prime 2^31 - 1, then one multiplicative step
# (multiplier ≈ 2^31 / golden ratio) modulo the prime. Every intermediate is
# below 2^62, so the result is exact integer arithmetic on every backend; the
# constants are part of the saved model's contract (serving hashes as training did).
HASH_PRIME = 2**31 - 1
HASH_MULTIPLIER = 1_327_217_885
HASH_INCREMENT = 12_345


def hash_buckets(values: torch.Tensor, buckets: int) -> torch.Tensor:
    """Raw int64 values (any shape) -> bucket indices in ``0..buckets-1`` (same shape)."""
    folded = torch.bitwise_xor(values, values >> 32)
    reduced = torch.remainder(folded, HASH_PRIME)
    mixed = torch.remainder(reduced * HASH_MULTIPLIER + HASH_INCREMENT, HASH_PRIME)
    return torch.remainder(mixed, buckets)


@dataclass(frozen=True)
class SequenceColumn:
    """A pooled id sequence: its own table of ``rows`` (row 0 = padding), or a categorical column's.

    ``shared_with`` is the index of a vocabulary column whose embeddings the
    sequence reuses (e.g. the history of item ids beside the item id column):
    the ids then live in that column's id space.
    """

    rows: int = 0
    shared_with: int | None = None

    def __post_init__(self) -> None:
        if (self.rows > 0) == (self.shared_with is not None):
            raise ValueError(
                f"a sequence needs exactly one of rows > 0 or shared_with, got rows={self.rows}, "
                f"shared_with={self.shared_with}"
            )
        if self.rows < 0 or (self.shared_with is not None and self.shared_with < 0):
            raise ValueError("rows and shared_with must be >= 0")


@dataclass(frozen=True)
class FeatureLayout:
    """The input columns the reranker expects, in the column order of :class:`FeatureBatch`.

    Comes from the feature spec (data), not from hyper-parameters: vocabulary
    columns give their row count (vocabulary + 1; row 0 = unknown), hashed
    columns their bucket count, numeric columns their number (already
    normalised; precomputed embedding features count as numeric columns).
    """

    categorical: tuple[int, ...] = ()
    hashed: tuple[int, ...] = ()
    numeric: int = 0
    sequences: tuple[SequenceColumn, ...] = ()

    def __post_init__(self) -> None:
        if any(rows < 2 for rows in self.categorical):
            raise ValueError(
                f"categorical needs >= 2 rows per column (unknown + one value), got {self.categorical}"
            )
        if any(buckets < 1 for buckets in self.hashed):
            raise ValueError(f"hashed needs >= 1 bucket per column, got {self.hashed}")
        if self.numeric < 0:
            raise ValueError(f"numeric must be >= 0, got {self.numeric}")
        for sequence in self.sequences:
            if sequence.shared_with is not None and sequence.shared_with >= len(self.categorical):
                raise ValueError(
                    f"sequences: shared_with={sequence.shared_with} but there are only "
                    f"{len(self.categorical)} categorical columns"
                )
        if not (self.categorical or self.hashed or self.numeric or self.sequences):
            raise ValueError("the layout has no columns")

    @property
    def embedded_columns(self) -> int:
        """Columns that become one embedding each (categorical, hashed, pooled sequences)."""
        return len(self.categorical) + len(self.hashed) + len(self.sequences)


@dataclass(frozen=True)
class FeatureBatch:
    """One batch of reranker inputs; absent groups are ``None`` / empty.

    categorical (B, C) int64 vocabulary indices (0 or out of range = unknown);
    hashed (B, H) int64 raw values (hashed inside the model); numeric (B, N)
    float32, already normalised; sequences: one (B, L_s) int64 per sequence
    column, 0 = padding (L_s may differ between columns).
    """

    categorical: torch.Tensor | None = None
    hashed: torch.Tensor | None = None
    numeric: torch.Tensor | None = None
    sequences: tuple[torch.Tensor, ...] = ()

    @property
    def batch_size(self) -> int:
        for tensor in (self.categorical, self.hashed, self.numeric, *self.sequences):
            if tensor is not None:
                return tensor.shape[0]
        raise ValueError("the batch has no tensors")


@dataclass(frozen=True)
class RerankerConfig:
    """Hyper-parameters of :class:`Reranker` (the data's columns are a :class:`FeatureLayout`)."""

    # "moe" is the model; "dense" and "logistic" are the ablation baselines.
    kind: Kind = "moe"
    # One gate and one head per task; the first is the main one (click).
    tasks: tuple[str, ...] = ("click", "rating")
    # Width of each embedded column; CTR models use 8-32 (more rarely pays on sparse fields).
    embedding_dim: int = 16
    # 8 experts, 2 active: the usual sparse-MoE point (Shazeer 2017; GShard top-2).
    n_experts: int = 8
    top_k: int = 2
    # Hidden widths of each expert MLP; () makes an expert one linear layer.
    expert_hidden: tuple[int, ...] = (128,)
    # Width of each expert's output (the representation the heads read).
    expert_dim: int = 64
    # Std of the Gaussian noise on the gate logits in training only; breaks
    # early ties so every expert gets tokens (Shazeer's noisy top-k, fixed std).
    gate_noise: float = 0.1
    # Tokens an expert takes per task in training: ceil(factor · B · k / E).
    # Switch Transformer's 1.25 leaves room for imbalance; larger drops less.
    capacity_factor: float = 1.25
    # Weight of the load-balancing loss; Switch Transformer's 0.01.
    aux_loss_weight: float = 0.01
    dropout: float = 0.0
    # Hidden widths of the dense baseline; None sizes it to the MoE's active
    # parameters per sample (:func:`dense_hidden_for`), the honest ablation.
    dense_hidden: tuple[int, ...] | None = None
    # Sparse gradients for the embedding table (lazy Adam, see models.optimizers):
    # fast on CPU; NCCL cannot all-reduce them on GPU DDP.
    sparse_embeddings: bool = True
    # Factorisation-machine pairwise term over the field embeddings, added to each
    # task's score (DeepFM's "wide" part): explicit 2nd-order crosses the MLPs
    # otherwise have to learn.
    field_interactions: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be non-empty and unique, got {self.tasks}")
        if self.embedding_dim < 1 or self.expert_dim < 1:
            raise ValueError(
                f"embedding_dim and expert_dim must be >= 1, got {self.embedding_dim}, "
                f"{self.expert_dim}"
            )
        if self.n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {self.n_experts}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be in 1..n_experts={self.n_experts}, got {self.top_k}")
        if any(w < 1 for w in self.expert_hidden):
            raise ValueError(f"expert_hidden widths must be >= 1, got {self.expert_hidden}")
        if self.dense_hidden is not None and any(w < 1 for w in self.dense_hidden):
            raise ValueError(f"dense_hidden widths must be >= 1, got {self.dense_hidden}")
        if self.gate_noise < 0:
            raise ValueError(f"gate_noise must be >= 0, got {self.gate_noise}")
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")
        if self.aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {self.aux_loss_weight}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class FeatureEmbedder(nn.Module):
    """:class:`FeatureBatch` -> (B, F), F = D · (C + H + S) + N.

    Every embedded column lives in one table (row blocks at fixed offsets), so
    a batch costs one lookup for all embedded columns instead of one per
    column, and one sparse gradient for the optimiser. Row 0 of a
    vocabulary block is the trained "unknown" row; sequences mean-pool their
    non-padding ids (row 0 excluded; all-padding gives zeros).

    The lookup is a single ``embedding_bag``: every single-id column is a bag
    of one id (weight 1, so its output is the row itself), every sequence a
    bag of its L ids with the mean-pooling weights. Two lookups (a plain
    embedding beside a bag) would give two sparse gradients, and autograd's
    sparse + sparse addition cost more than the rest of the embedder.
    """

    def __init__(self, layout: FeatureLayout, embedding_dim: int, sparse: bool = True) -> None:
        super().__init__()
        self.layout = layout
        own_sequences = [s.rows for s in layout.sequences if s.shared_with is None]
        sizes = [*layout.categorical, *layout.hashed, *own_sequences]
        starts = [0, *itertools.accumulate(sizes)]
        n_cat, n_hash = len(layout.categorical), len(layout.hashed)
        self.register_buffer(
            "categorical_offsets", torch.tensor(starts[:n_cat], dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "categorical_rows", torch.tensor(layout.categorical, dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "hashed_offsets",
            torch.tensor(starts[n_cat : n_cat + n_hash], dtype=torch.long),
            persistent=False,
        )
        own = iter(starts[n_cat + n_hash :])
        # (offset, rows) of each sequence's block: its own, or its categorical column's.
        self.sequence_blocks = [
            (next(own), s.rows)
            if s.shared_with is None
            else (starts[s.shared_with], layout.categorical[s.shared_with])
            for s in layout.sequences
        ]
        self.table = nn.Embedding(max(1, starts[-1]), embedding_dim, sparse=sparse)
        # Small initial vectors: F sums dozens of columns, and the gates' first
        # routing should come from the data rather than from a few large rows.
        nn.init.normal_(self.table.weight, std=0.05)
        self.out_dim = embedding_dim * layout.embedded_columns + layout.numeric

    def forward(self, batch: FeatureBatch) -> torch.Tensor:
        """batch -> (B, F)."""
        if len(batch.sequences) != len(self.layout.sequences):
            raise ValueError(
                f"batch has {len(batch.sequences)} sequences, the layout {len(self.layout.sequences)}"
            )
        parts: list[torch.Tensor] = []
        if self.layout.embedded_columns:
            parts.append(self._embedded(batch))
        if self.layout.numeric:
            parts.append(self._checked(batch.numeric, "numeric", self.layout.numeric).float())
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _embedded(self, batch: FeatureBatch) -> torch.Tensor:
        """batch -> (B, (C + H + S) · D), the embedded columns in layout order."""
        b = batch.batch_size
        ids, weights = self._bags(batch)  # (B, W) each
        # Bag starts within one sample's W ids: one per single-id column, then
        # one per sequence (its length is the batch's, so computed per call).
        lengths = [1] * (len(self.layout.categorical) + len(self.layout.hashed))
        lengths += [s.shape[1] for s in batch.sequences]
        starts = torch.tensor([0, *itertools.accumulate(lengths)][:-1], device=ids.device)
        offsets = torch.arange(b, device=ids.device).unsqueeze(1) * ids.shape[1] + starts
        return F.embedding_bag(
            ids.reshape(-1),
            self.table.weight,
            offsets.reshape(-1),
            mode="sum",
            per_sample_weights=weights.reshape(-1),
            sparse=self.table.sparse,
        ).view(b, -1)

    def _bags(self, batch: FeatureBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """batch -> table rows (B, W) and their weights (B, W), W = C + H + Σ L_s.

        Single-id columns weigh 1; a sequence's kept ids weigh 1 / (kept
        count), its padding (mapped to its block's row 0) weighs 0.
        """
        b = batch.batch_size
        rows: list[torch.Tensor] = []
        if self.layout.categorical:
            ids = self._checked(batch.categorical, "categorical", len(self.layout.categorical))
            known = (ids > PAD) & (ids < self.categorical_rows)
            rows.append(torch.where(known, ids, torch.zeros_like(ids)) + self.categorical_offsets)
        if self.layout.hashed:
            raw = self._checked(batch.hashed, "hashed", len(self.layout.hashed))
            buckets = torch.stack(
                [hash_buckets(raw[:, h], n) for h, n in enumerate(self.layout.hashed)], dim=1
            )
            rows.append(buckets + self.hashed_offsets)
        weights = [self.table.weight.new_ones(b, sum(r.shape[1] for r in rows))]
        for ids, (offset, n_rows) in zip(batch.sequences, self.sequence_blocks, strict=True):
            keep = (ids > PAD) & (ids < n_rows)  # out-of-range ids count as padding
            rows.append(torch.where(keep, ids, torch.zeros_like(ids)) + offset)
            mean = keep.to(weights[0].dtype) / keep.sum(dim=1, keepdim=True).clamp_min(1)
            weights.append(mean)
        return torch.cat(rows, dim=1), torch.cat(weights, dim=1)

    @staticmethod
    def _checked(tensor: torch.Tensor | None, name: str, columns: int) -> torch.Tensor:
        if tensor is None or tensor.dim() != 2 or tensor.shape[1] != columns:
            shape = None if tensor is None else tuple(tensor.shape)
            raise ValueError(f"batch.{name} must be (B, {columns}), got {shape}")
        return tensor


@dataclass(frozen=True)
class Routing:
    """Where a batch went, per task: all (T, B, k).

    ``experts`` the top-k expert indices (best first); ``weights`` the mixing
    weights after capacity (0 for a dropped route; the kept ones renormalised
    to sum to 1); ``kept`` whether the route fitted in the expert's capacity.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor


@dataclass(frozen=True)
class BlockOutput:
    """What every body returns: per-task representations (T, B, D), the aux loss (scalar)."""

    representations: torch.Tensor
    aux_loss: torch.Tensor
    routing: Routing | None = None


class Expert(nn.Module):
    """(n, F) -> (n, D): an MLP ending in ReLU (its output is a representation, not a score)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int, dropout: float) -> None:
        super().__init__()
        self.net = mlp(in_dim, hidden, out_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.net(x))


class NoisyTopKGate(nn.Module):
    """(B, F) -> top-k experts (B, k), their softmax weights (B, k), all probabilities (B, E).

    Gaussian noise (std ``noise``) is added to the logits in training only, so
    evaluation is deterministic. The k weights are a softmax over the k chosen
    logits (Shazeer et al. 2017); the probabilities over all E experts feed the
    load-balancing loss.
    """

    def __init__(self, in_dim: int, n_experts: int, top_k: int, noise: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, n_experts)
        self.top_k = top_k
        self.noise = noise

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.linear(x)
        if self.training and self.noise > 0:
            logits = logits + torch.randn_like(logits) * self.noise
        top_logits, experts = logits.topk(self.top_k, dim=1)
        return experts, torch.softmax(top_logits, dim=1), torch.softmax(logits, dim=1)


def load_balancing_loss(experts: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Switch/GShard auxiliary loss ``E · Σ_i f_i · P_i`` (scalar; 1 when balanced).

    experts (B, k) the routed experts, probs (B, E) the gate's probabilities.
    ``f_i`` is the share of the B · k routes that chose expert i (before
    capacity; not differentiable), ``P_i`` the mean probability of expert i
    (differentiable): the gradient lowers the probability of overloaded experts.
    Uniform probabilities give exactly 1 whatever the routing; a gate that
    sends everything to one expert with certainty gives E (k = 1).
    """
    n_experts = probs.shape[1]
    counts = torch.bincount(experts.flatten(), minlength=n_experts).to(probs.dtype)
    fraction = counts / experts.numel()
    return n_experts * (fraction * probs.mean(dim=0)).sum()


def expert_capacity(batch_size: int, top_k: int, n_experts: int, factor: float) -> int:
    """Routes one expert takes from one gate in training: ceil(factor · B · k / E)."""
    return math.ceil(factor * batch_size * top_k / n_experts)


def within_capacity(experts: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """experts (B, k) -> kept (B, k): each expert keeps its first ``capacity`` routes.

    Priority is rank-major (GShard): every token's first choice is placed
    before any second choice; within a rank, batch order. So overflow first
    drops low-ranked routes, and a token loses its top-1 expert only when
    that expert is full of other tokens' top-1 routes.
    """
    order = experts.t().reshape(-1)  # (k·B,) rank-major
    one_hot = F.one_hot(order, n_experts)  # (k·B, E)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1  # place in its expert's queue
    return (position < capacity).reshape(experts.shape[1], -1).t()


class SparseMoE(nn.Module):
    """(B, F) -> per-task mixtures (T, B, D) of E shared experts (MMoE with sparse top-k gates).

    Each task has its own :class:`NoisyTopKGate`; a token's mixture for a task
    is the weighted sum of that task's k experts. Compute is sparse: the
    (token, expert) pairs that any task routed are sorted by expert, and each
    expert runs once on its own tokens (gathered with ``index_select``), so a
    batch costs about (distinct routed pairs) expert evaluations, never B · E.
    A pair two tasks share is computed once.

    Capacity (training only): an expert takes at most
    :func:`expert_capacity` routes from each task's gate; a route past it is
    dropped: that expert contributes nothing to the token's mixture for that
    task and the token's kept weights are renormalised to sum to 1 (a softmax
    over its surviving top-k logits); a token with every route dropped gets a
    zero mixture (its head sees only the bias). Evaluation drops nothing, so
    a candidate's score never depends on the other rows of its batch.
    """

    def __init__(self, in_dim: int, config: RerankerConfig) -> None:
        super().__init__()
        self.config = config
        self.experts = nn.ModuleList(
            Expert(in_dim, config.expert_hidden, config.expert_dim, config.dropout)
            for _ in range(config.n_experts)
        )
        self.gates = nn.ModuleList(
            NoisyTopKGate(in_dim, config.n_experts, config.top_k, config.gate_noise)
            for _ in config.tasks
        )

    def forward(self, x: torch.Tensor) -> BlockOutput:
        """x (B, F) -> mixtures (T, B, D), weighted mean aux loss over tasks, routing (T, B, k)."""
        b, n_experts = x.shape[0], self.config.n_experts
        capacity = expert_capacity(b, self.config.top_k, n_experts, self.config.capacity_factor)
        experts, weights, kept, aux = [], [], [], []
        for gate in self.gates:
            chosen, gate_weights, probs = gate(x)
            keep = (
                within_capacity(chosen, n_experts, capacity)
                if self.training
                else torch.ones_like(chosen, dtype=torch.bool)
            )
            # Renormalise over the kept routes; clamp so an all-dropped token gives 0, not NaN.
            kept_weights = gate_weights * keep
            kept_weights = kept_weights / kept_weights.sum(dim=1, keepdim=True).clamp_min(1e-9)
            experts.append(chosen)
            weights.append(kept_weights)
            kept.append(keep)
            aux.append(load_balancing_loss(chosen, probs))
        routing = Routing(torch.stack(experts), torch.stack(weights), torch.stack(kept))
        mixtures = self._mix(x, routing)
        aux_loss = self.config.aux_loss_weight * torch.stack(aux).mean()
        return BlockOutput(mixtures, aux_loss, routing)

    def _mix(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x (B, F), routing (T, B, k) -> (T, B, D)."""
        b, n_experts = x.shape[0], self.config.n_experts
        # (B, E) pairs any task kept, then their tokens grouped by expert.
        needed = torch.zeros(b * n_experts, dtype=torch.bool, device=x.device)
        token = torch.arange(b, device=x.device).view(1, b, 1).expand_as(routing.experts)
        flat = token * n_experts + routing.experts
        needed[flat[routing.kept]] = True
        pair_expert, pair_token = needed.view(b, n_experts).t().nonzero(as_tuple=True)
        counts = torch.bincount(pair_expert, minlength=n_experts).tolist()
        # One gather for all pairs, then each expert reads its contiguous slice:
        # its backward is one scatter into a (B, F) gradient, not one per expert.
        inputs = x.index_select(0, pair_token).split(counts)  # E × (n_e, F)
        outputs = [
            expert(tokens)
            for expert, tokens, n in zip(self.experts, inputs, counts, strict=True)
            if n  # an expert with no tokens is not called (and gets no gradient)
        ]
        n_pairs = pair_token.numel()
        outputs.append(x.new_zeros(1, self.config.expert_dim))  # row n_pairs: dropped routes
        stacked = torch.cat(outputs)  # (P + 1, D)
        # slot[token · E + expert] = the pair's row in `stacked`.
        slot = torch.full((b * n_experts,), n_pairs, dtype=torch.long, device=x.device)
        slot[pair_token * n_experts + pair_expert] = torch.arange(n_pairs, device=x.device)
        rows = slot[flat]  # (T, B, k); a dropped route whose pair exists has weight 0
        gathered = stacked.index_select(0, rows.reshape(-1)).view(*rows.shape, -1)
        return (gathered * routing.weights.unsqueeze(-1)).sum(dim=2)


class DenseBlock(nn.Module):
    """(B, F) -> (T, B, D): one shared MLP (shared-bottom multi-task), the dense baseline."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], config: RerankerConfig) -> None:
        super().__init__()
        self.n_tasks = len(config.tasks)
        self.expert = Expert(in_dim, hidden, config.expert_dim, config.dropout)

    def forward(self, x: torch.Tensor) -> BlockOutput:
        out = self.expert(x)
        return BlockOutput(out.expand(self.n_tasks, *out.shape), out.new_zeros(()))


class LinearBlock(nn.Module):
    """(B, F) -> (T, B, F) unchanged: with linear heads this is logistic regression."""

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.n_tasks = n_tasks

    def forward(self, x: torch.Tensor) -> BlockOutput:
        return BlockOutput(x.expand(self.n_tasks, *x.shape), x.new_zeros(()))


def _mlp_parameters(in_dim: int, hidden: Sequence[int], out_dim: int) -> int:
    widths = [in_dim, *hidden, out_dim]
    return sum(a * b + b for a, b in itertools.pairwise(widths))


def moe_active_parameters(in_dim: int, config: RerankerConfig) -> int:
    """Weights one sample multiplies through in the MoE block: every gate + k experts."""
    gates = len(config.tasks) * (in_dim * config.n_experts + config.n_experts)
    expert = _mlp_parameters(in_dim, config.expert_hidden, config.expert_dim)
    return gates + config.top_k * expert


def dense_hidden_for(in_dim: int, config: RerankerConfig) -> tuple[int, ...]:
    """Hidden widths of a dense MLP with about the MoE block's active parameters per sample.

    The expert's widths scaled by one factor (found by bisection; parameters
    grow monotonically with it); experts without hidden layers give one
    hidden layer, since a single linear layer cannot be made any larger.
    """
    target = moe_active_parameters(in_dim, config)
    shape = config.expert_hidden or (1,)

    def widths(scale: float) -> tuple[int, ...]:
        return tuple(max(1, round(w * scale)) for w in shape)

    low, high = 0.0, float(target)
    for _ in range(60):
        mid = (low + high) / 2
        if _mlp_parameters(in_dim, widths(mid), config.expert_dim) < target:
            low = mid
        else:
            high = mid
    return min(
        (widths(low), widths(high)),
        key=lambda w: abs(_mlp_parameters(in_dim, w, config.expert_dim) - target),
    )


@dataclass(frozen=True)
class RerankerOutput:
    """Per-task scores ``outputs[task]`` (B,) (logit or regression), the weighted aux loss ()."""

    outputs: dict[str, torch.Tensor]
    aux_loss: torch.Tensor
    routing: Routing | None = field(default=None, repr=False)


class Reranker(nn.Module):
    """:class:`FeatureBatch` -> per-task scores; the body is chosen by ``config.kind``."""

    def __init__(self, layout: FeatureLayout, config: RerankerConfig) -> None:
        super().__init__()
        self.layout = layout
        self.config = config
        self.embedder = FeatureEmbedder(layout, config.embedding_dim, config.sparse_embeddings)
        in_dim = self.embedder.out_dim
        self.dense_hidden = (
            config.dense_hidden
            if config.dense_hidden is not None
            else dense_hidden_for(in_dim, config)
        )
        builders = {
            "moe": lambda: SparseMoE(in_dim, config),
            "dense": lambda: DenseBlock(in_dim, self.dense_hidden, config),
            "logistic": lambda: LinearBlock(len(config.tasks)),
        }
        self.body: nn.Module = builders[config.kind]()
        head_in = in_dim if config.kind == "logistic" else config.expert_dim
        self.heads = nn.ModuleDict({task: nn.Linear(head_in, 1) for task in config.tasks})
        # Embedded fields (categorical, hashed, sequences) lead the embedder's output.
        self.n_fields = len(layout.categorical) + len(layout.hashed) + len(layout.sequences)
        self.interaction_heads = (
            nn.ModuleDict(
                {task: nn.Linear(config.embedding_dim, 1, bias=False) for task in config.tasks}
            )
            if config.field_interactions and self.n_fields > 1
            else None
        )

    def forward(self, batch: FeatureBatch) -> RerankerOutput:
        """batch -> outputs[task] (B,) for every task, aux loss ()."""
        features = self.embedder(batch)  # (B, F)
        block: BlockOutput = self.body(features)
        outputs = {
            task: head(block.representations[t]).squeeze(1)
            for t, (task, head) in enumerate(self.heads.items())
        }
        if self.interaction_heads is not None:
            pairs = field_interactions(features, self.n_fields, self.config.embedding_dim)
            outputs = {
                task: score + self.interaction_heads[task](pairs).squeeze(1)
                for task, score in outputs.items()
            }
        return RerankerOutput(outputs, block.aux_loss, block.routing)


def field_interactions(features: torch.Tensor, n_fields: int, dim: int) -> torch.Tensor:
    """(B, F) embedder output -> (B, D) sum over field pairs i < j of v_i ⊙ v_j (FM trick).

    ``0.5 · ((Σ v)² − Σ v²)``: all pairs in O(fields · D) instead of O(fields² · D).
    """
    fields = features[:, : n_fields * dim].view(features.shape[0], n_fields, dim)
    return 0.5 * (fields.sum(dim=1).square() - fields.square().sum(dim=1))


def active_parameters(model: Reranker) -> int:
    """Weights one sample multiplies through (body + heads), for sizing honest baselines.

    Embedding rows are excluded (a lookup, not a multiply-add, and the same in
    every kind). For the MoE: every task's gate and ``top_k`` experts; with
    several tasks whose gates disagree a sample can reach up to
    ``min(E, T · k)`` distinct experts, so this is the per-task figure (at
    the defaults, two tasks with freshly initialised gates run ~3.4 distinct
    experts per sample, not 2: the dense baseline then does less work).
    """
    heads = sum(p.numel() for p in model.heads.parameters())
    in_dim = model.embedder.out_dim
    config = model.config
    body = {
        "moe": lambda: moe_active_parameters(in_dim, config),
        "dense": lambda: _mlp_parameters(in_dim, model.dense_hidden, config.expert_dim),
        "logistic": lambda: 0,
    }[config.kind]()
    return body + heads
