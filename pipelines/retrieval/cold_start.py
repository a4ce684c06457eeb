"""Cold-start items: index vectors for items the two-tower has no trained id for.

Items that arrived after training (ids ``>= n_items`` of the model) get the
item tower's content-only vector (:meth:`models.two_tower.ItemTower.content_only`:
the padding id row plus their attributes), the path ``item_id_dropout``
trains. Their attributes are encoded with the encoding saved beside the model
(:func:`models.artifacts.load_item_encoding`), so codes mean what they meant
in training: a value no training item had reads as the unknown row, a missing
number as the training mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from features.encoding import AttributeEncoding
from models.two_tower import TwoTowerModel

# Items encoded per forward pass (bounds the attribute tensors of a large arrival).
CHUNK = 65_536


@dataclass(frozen=True)
class CatalogueVectors:
    """What the index is built from: ``ids`` (N,) int64 and ``vectors`` (N, D) float32,
    the trained items ``0..n_items-1`` first, then ``content_only`` new items; ``skipped``
    says why items past the trained range got no vector (None: none were left out)."""

    ids: np.ndarray
    vectors: np.ndarray
    content_only: int
    skipped: str | None = None


def catalogue_vectors(
    model: TwoTowerModel, encoding: AttributeEncoding | None, items: pl.DataFrame | None
) -> CatalogueVectors:
    """Vectors of every trained item and, content-only, of the ``items`` rows past them."""
    with torch.no_grad():
        trained = model.all_item_vectors().float().numpy()
    ids = np.arange(len(trained), dtype=np.int64)
    n_items = model.config.n_items
    new = (
        items.filter(pl.col("item_id") >= n_items).sort("item_id")
        if items is not None
        else pl.DataFrame()
    )
    if new.height == 0:
        return CatalogueVectors(ids, trained, 0)
    if model.item_tower.attributes is None:
        # Every new item would get the same vector (the padding row alone): nothing to rank by.
        return CatalogueVectors(ids, trained, 0, "the two-tower has no item attributes")
    if encoding is None:
        return CatalogueVectors(ids, trained, 0, "no item encoding saved beside the two-tower")
    vectors = content_only_vectors(model, encoding, new)
    new_ids = new.get_column("item_id").to_numpy().astype(np.int64)
    return CatalogueVectors(
        np.concatenate([ids, new_ids]), np.concatenate([trained, vectors]), int(new_ids.size)
    )


def content_only_vectors(
    model: TwoTowerModel, encoding: AttributeEncoding, items: pl.DataFrame
) -> np.ndarray:
    """(len(items), D) float32 content-only vectors of ``items`` (``item_id`` + attributes).

    Raises ``ValueError`` when ``encoding`` does not produce the inputs the
    model's item attribute encoder was built for (an encoding of another model).
    """
    encoder = model.item_tower.attributes
    if encoder is None:
        raise ValueError("the two-tower has no item attributes to encode")
    expected = (
        tuple(e.num_embeddings - 1 for e in encoder.embeddings),
        int(encoder.numeric.shape[1]) if "numeric" in encoder.tables else 0,
        int(encoder.multi_hot.shape[1]) if "multi_hot" in encoder.tables else 0,
    )
    got = (
        tuple(len(v) for v in encoding.categorical.values()),
        len(encoding.numeric),
        sum(len(v) for v in encoding.multi_hot.values()),
    )
    if got != expected:
        raise ValueError(
            f"item encoding gives (cardinalities, numeric, multi-hot) {got}, "
            f"the two-tower's item attributes are {expected}"
        )
    parts = []
    with torch.no_grad():
        for part in items.iter_slices(CHUNK):
            parts.append(model.item_tower.content_only(encoding.apply(part)).float().numpy())
    dim = model.config.embedding_dim
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
