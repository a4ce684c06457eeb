"""The two-tower retrieval network: a user tower and an item tower in one space.

Composed from small named parts (shapes in the docstrings)::

    ItemTower:  item id embedding (B, D) ─┐
                item attributes  (B, A) ──┴─► MLP ─► L2-normalise ─► (B, D)
    UserTower:  hashed user id    (B, D) ─┐
                pooled history    (B, D) ─┤   (mean of the item id embeddings)
                user attributes   (B, A) ─┴─► MLP ─► L2-normalise ─► (B, D)

The network returns embeddings only; :class:`models.retrieval_task.RetrievalTask`
owns the loss, and the training loop (pipelines) owns optimisers and devices.
Embedding tables produce sparse gradients (see :mod:`models.optimizers`): one
step touches a few thousand rows, and a dense optimiser sweeping every row of
every table each step is what makes CPU training ~10× slower.

Ids are dense indices (``0..n-1``) from the dataset's id map. Item index ``i``
uses embedding row ``i + 1``; row 0 is the padding/unknown row (kept zero), so
history padding and items unseen at training time (the content-only path)
share it. User ids are hashed into ``user_hash_buckets`` rows, so an unseen
user id still maps to a trained row.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from features.encoding import AttributeTable

# Padding / unknown-item row of the item id embedding.
PAD = 0


def history_rows(items: Sequence[int], length: int, n_items: int) -> np.ndarray:
    """(length,) int64 item embedding rows (id + 1) of the last ``length`` items of
    ``items`` (most recent last), those the model knows (``0 <= id < n_items``)
    left-aligned, :data:`PAD` after them: one user's history for the user tower
    (which pools the non-PAD rows, so dropping an unknown id equals padding it)."""
    known = [item + 1 for item in items[-length:] if 0 <= item < n_items]
    rows = np.full(length, PAD, dtype=np.int64)
    rows[: len(known)] = known
    return rows


@dataclass(frozen=True)
class TwoTowerConfig:
    """Hyper-parameters of :class:`TwoTowerModel` (defaults tuned on MovieLens-100K)."""

    n_items: int
    n_users: int
    # Output and id-embedding width; 64 is the usual retrieval size (index cost grows with it).
    embedding_dim: int = 64
    # Hash buckets of the user id; at least n_users, so known users never collide.
    user_hash_buckets: int = 0
    # Recent items pooled into the user vector (longer: richer, slower per step).
    history_length: int = 50
    # Hidden widths of each tower's MLP; () is a linear projection.
    hidden: tuple[int, ...] = (256,)
    # Width of each categorical attribute embedding.
    attribute_dim: int = 16
    dropout: float = 0.0
    # Share of training rows whose item id embedding is hidden, which trains the
    # content-only path that new items are indexed with.
    item_id_dropout: float = 0.05
    # Parts switched off by config give the baselines in the same code path:
    # use_history/use_attributes False and hidden () is matrix factorisation.
    use_user_id: bool = True
    use_history: bool = True
    use_attributes: bool = True
    # Sparse id-embedding gradients (lazy Adam on the rows of the batch) are what
    # makes CPU training fast; GPUs sweep dense tables cheaply, and NCCL cannot
    # all-reduce sparse gradients across DDP workers.
    sparse_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.n_items < 1 or self.n_users < 1:
            raise ValueError(
                f"n_items and n_users must be >= 1, got {self.n_items}, {self.n_users}"
            )
        if self.embedding_dim < 1 or self.history_length < 1:
            raise ValueError("embedding_dim and history_length must be >= 1")
        if not (self.use_user_id or self.use_history or self.use_attributes):
            raise ValueError("the user tower needs at least one of id, history, attributes")

    @property
    def buckets(self) -> int:
        return max(self.user_hash_buckets, self.n_users)


class AttributeEncoder(nn.Module):
    """(B,) row indices into an :class:`AttributeTable` -> (B, A) dense attribute vector.

    The table lives in buffers (saved with the model); rows past the table
    (entities unseen at training) read as all-missing.
    """

    def __init__(self, table: AttributeTable, attribute_dim: int) -> None:
        super().__init__()
        # Only non-empty tables become buffers: zero-size tensors share a null data
        # pointer, which torch.save refuses to store under different dtypes.
        self.rows = table.rows
        self.tables = [
            name
            for name, width in (
                ("categorical", len(table.cardinalities)),
                ("numeric", table.numeric.shape[1]),
                ("multi_hot", table.multi_hot.shape[1]),
            )
            if width
        ]
        dtypes = {"categorical": torch.long, "numeric": torch.float32, "multi_hot": torch.float32}
        for name in self.tables:
            self.register_buffer(name, torch.tensor(getattr(table, name), dtype=dtypes[name]))
        self.embeddings = nn.ModuleList(
            nn.Embedding(card + 1, attribute_dim, padding_idx=0) for card in table.cardinalities
        )
        self.out_dim = (
            attribute_dim * len(table.cardinalities)
            + table.numeric.shape[1]
            + table.multi_hot.shape[1]
        )

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (B,) int64 -> (B, A)."""
        known = rows < self.rows
        safe = torch.where(known, rows, torch.zeros_like(rows))
        parts = [emb(self.categorical[safe, c]) for c, emb in enumerate(self.embeddings)]
        parts += [getattr(self, name)[safe] for name in self.tables if name != "categorical"]
        out = torch.cat(parts, dim=1)
        return out * known.unsqueeze(1)

    def encode(self, table: AttributeTable) -> torch.Tensor:
        """Attribute vectors of rows given as a table (new entities), (N, A)."""
        categorical = torch.as_tensor(table.categorical, dtype=torch.long)
        parts = [emb(categorical[:, c]) for c, emb in enumerate(self.embeddings)]
        parts += [
            torch.as_tensor(table.numeric, dtype=torch.float32),
            torch.as_tensor(table.multi_hot, dtype=torch.float32),
        ]
        return torch.cat(parts, dim=1)


class ByteDropout(nn.Module):
    """Dropout whose keep-mask comes from random bytes: drop probability rounded to 1/256.

    On CPU, ``nn.Dropout``'s ``bernoulli_`` draws one random number per element
    (~2.5 ms for a 1024×256 activation here, ~10% of a training step); eight
    mask bytes per 64-bit draw make the mask ~6× cheaper. Same expectation:
    kept activations are scaled by 1 / (1 - p).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.threshold = round(p * 256)
        self.scale = 1.0 / (1.0 - self.threshold / 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        words = -(-x.numel() // 8)
        draws = torch.randint(-(2**63), 2**63 - 1, (words,), dtype=torch.int64, device=x.device)
        keep = draws.view(torch.uint8)[: x.numel()].view(x.shape) >= self.threshold
        return x * (keep.to(x.dtype) * self.scale)


def mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int, dropout: float) -> nn.Sequential:
    """Linear -> ReLU (-> dropout) per hidden width, then a linear output layer."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        if dropout > 0:
            layers.append(ByteDropout(dropout))
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class ItemTower(nn.Module):
    """Item indices (B,) -> L2-normalised item vectors (B, D)."""

    def __init__(self, config: TwoTowerConfig, attributes: AttributeTable) -> None:
        super().__init__()
        d = config.embedding_dim
        self.config = config
        self.id_embedding = nn.Embedding(
            config.n_items + 1, d, padding_idx=PAD, sparse=config.sparse_embeddings
        )
        nn.init.normal_(self.id_embedding.weight, std=0.1)
        with torch.no_grad():
            self.id_embedding.weight[PAD].zero_()
        self.attributes = (
            AttributeEncoder(attributes, config.attribute_dim)
            if config.use_attributes and attributes.width
            else None
        )
        in_dim = d + (self.attributes.out_dim if self.attributes else 0)
        self.project = mlp(in_dim, config.hidden, d, config.dropout)

    def id_rows(self, items: torch.Tensor) -> torch.Tensor:
        """Item indices (any shape) -> embedding rows; unknown/negative ids -> PAD."""
        known = (items >= 0) & (items < self.config.n_items)
        return torch.where(known, items + 1, torch.full_like(items, PAD))

    def forward(self, items: torch.Tensor, hide_id: torch.Tensor | None = None) -> torch.Tensor:
        """items (B,) int64; hide_id (B,) bool drops the id embedding (content only)."""
        rows = self.id_rows(items)
        if hide_id is not None:
            rows = torch.where(hide_id, torch.full_like(rows, PAD), rows)
        parts = [self.id_embedding(rows)]
        if self.attributes is not None:
            parts.append(self.attributes(torch.clamp(items, min=0)))
        return F.normalize(self.project(torch.cat(parts, dim=1)), dim=1)

    def content_only(self, attributes: AttributeTable) -> torch.Tensor:
        """Vectors of new items from their attributes alone, (N, D)."""
        n = attributes.rows
        parts = [self.id_embedding.weight[PAD].expand(n, -1)]
        if self.attributes is not None:
            parts.append(self.attributes.encode(attributes))
        return F.normalize(self.project(torch.cat(parts, dim=1)), dim=1)


class UserTower(nn.Module):
    """(user ids (B,), histories (B, L)) -> L2-normalised user vectors (B, D).

    Histories hold item *embedding rows* (``item index + 1``, 0 = padding) and
    are mean-pooled over the item tower's id embedding (shared weights).
    """

    def __init__(
        self, config: TwoTowerConfig, attributes: AttributeTable, item_embedding: nn.Embedding
    ) -> None:
        super().__init__()
        d = config.embedding_dim
        self.config = config
        self.item_embedding = item_embedding
        self.id_embedding = (
            nn.Embedding(config.buckets, d, sparse=config.sparse_embeddings)
            if config.use_user_id
            else None
        )
        if self.id_embedding is not None:
            nn.init.normal_(self.id_embedding.weight, std=0.1)
        self.attributes = (
            AttributeEncoder(attributes, config.attribute_dim)
            if config.use_attributes and attributes.width
            else None
        )
        in_dim = (
            (d if config.use_user_id else 0)
            + (d if config.use_history else 0)
            + (self.attributes.out_dim if self.attributes else 0)
        )
        self.project = mlp(in_dim, config.hidden, d, config.dropout)

    def pool_history(self, history: torch.Tensor) -> torch.Tensor:
        """history (B, L) item rows -> (B, D) mean of the non-padding rows (empty: zeros).

        The batch's distinct rows are looked up once, so the sparse gradient has
        one row per distinct item instead of B * L (the optimiser's coalescing
        of B * L rows dominated a CPU step), and the mean is a sparse (B, U)
        CSR matrix of ``1 / length`` weights times those U rows: its backward is
        ~2× faster on CPU than ``embedding_bag``'s, and padding costs nothing.
        """
        rows, columns = distinct_rows(history, self.item_embedding.num_embeddings)
        keep = history != PAD  # (B, L)
        lengths = keep.sum(dim=1)  # (B,)
        crow = F.pad(lengths.cumsum(0), (1, 0))  # (B + 1,)
        weights = (1.0 / lengths.clamp_min(1).float()).repeat_interleave(lengths)
        with warnings.catch_warnings():
            # Sparse CSR is "beta" in torch; this use (CSR @ dense with autograd) is tested here.
            warnings.simplefilter("ignore", UserWarning)
            mean = torch.sparse_csr_tensor(
                crow,
                columns[keep],
                weights,
                size=(history.shape[0], rows.numel()),
                check_invariants=False,
            )
        # Autocast has no reduced-precision sparse kernels everywhere: pool in float32.
        with torch.autocast(history.device.type, enabled=False):
            return mean @ self.item_embedding(rows).float()

    def forward(self, users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """users (B,) int64 (any value: hashed), history (B, L) int64 rows -> (B, D)."""
        parts = []
        if self.id_embedding is not None:
            parts.append(self.id_embedding(torch.remainder(users, self.config.buckets)))
        if self.config.use_history:
            parts.append(self.pool_history(history))
        if self.attributes is not None:
            parts.append(self.attributes(torch.clamp(users, min=0)))
        return F.normalize(self.project(torch.cat(parts, dim=1)), dim=1)


def distinct_rows(ids: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (any shape) in ``0..n_rows-1`` -> (sorted distinct ids (U,), their positions, ids' shape).

    ``torch.unique`` without the sort: mark the present ids in an ``n_rows``
    mask; linear in ``n_rows + ids.numel()``, which beats sorting B * L ids
    for any catalogue that fits in memory.
    """
    present = torch.zeros(n_rows, dtype=torch.bool, device=ids.device)
    present[ids] = True
    rows = present.nonzero().squeeze(1)
    position = torch.empty(n_rows, dtype=torch.long, device=ids.device)
    position[rows] = torch.arange(rows.numel(), device=ids.device)
    return rows, position[ids]


class TwoTowerModel(nn.Module):
    """Both towers; ``forward`` gives the (user, item) vectors of a training batch."""

    def __init__(
        self,
        config: TwoTowerConfig,
        user_attributes: AttributeTable | None = None,
        item_attributes: AttributeTable | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.item_tower = ItemTower(config, item_attributes or AttributeTable.empty(config.n_items))
        self.user_tower = UserTower(
            config,
            user_attributes or AttributeTable.empty(config.n_users),
            self.item_tower.id_embedding,
        )

    def forward(
        self,
        users: torch.Tensor,
        history: torch.Tensor,
        items: torch.Tensor,
        hide_item_id: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """users (B,), history (B, L), items (B,) -> (user vectors (B, D), item vectors (B, D))."""
        return self.user_tower(users, history), self.item_tower(items, hide_item_id)

    @torch.no_grad()
    def all_item_vectors(self, chunk: int = 65_536) -> torch.Tensor:
        """Vectors of every trained item, (n_items, D), in index order."""
        ids = torch.arange(self.config.n_items)
        return torch.cat([self.item_tower(part) for part in ids.split(chunk)])
