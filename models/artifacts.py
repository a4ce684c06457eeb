"""Save and load a trained two-tower model as plain files (no pickled classes).

Layout of a model folder::

    two_tower.json   TwoTowerConfig + the shapes of both attribute tables
    two_tower.pt     the state dict (weights and attribute buffers), tensors only

Loading rebuilds the network from the JSON and loads the tensors with
``weights_only=True``, so a model file cannot run code, and the files load in
any process that has this package (MLflow's model wrapper, serving replicas).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from features.encoding import AttributeTable
from models.two_tower import AttributeEncoder, TwoTowerConfig, TwoTowerModel

CONFIG_FILE = "two_tower.json"
WEIGHTS_FILE = "two_tower.pt"
FORMAT_VERSION = 1


def _shape(encoder: AttributeEncoder | None, rows: int) -> dict[str, Any]:
    if encoder is None:
        return {"rows": rows, "cardinalities": [], "numeric": 0, "multi_hot": 0}
    return {
        "rows": encoder.rows,
        "cardinalities": [e.num_embeddings - 1 for e in encoder.embeddings],
        "numeric": int(encoder.numeric.shape[1]) if "numeric" in encoder.tables else 0,
        "multi_hot": int(encoder.multi_hot.shape[1]) if "multi_hot" in encoder.tables else 0,
    }


def _placeholder(shape: dict[str, Any]) -> AttributeTable:
    """A zero table of the saved shape; the state dict fills in the real values."""
    rows = int(shape["rows"])
    cards = tuple(int(c) for c in shape["cardinalities"])
    return AttributeTable(
        categorical=np.zeros((rows, len(cards)), np.int64),
        cardinalities=cards,
        numeric=np.zeros((rows, int(shape["numeric"])), np.float32),
        multi_hot=np.zeros((rows, int(shape["multi_hot"])), np.float32),
    )


def save_two_tower(model: TwoTowerModel, folder: Path) -> None:
    """Write ``model`` into ``folder`` (created if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = asdict(model.config)
    config["hidden"] = list(config["hidden"])
    meta = {
        "format_version": FORMAT_VERSION,
        "config": config,
        "user_attributes": _shape(model.user_tower.attributes, model.config.n_users),
        "item_attributes": _shape(model.item_tower.attributes, model.config.n_items),
    }
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def load_two_tower(folder: Path) -> TwoTowerModel:
    """The model saved in ``folder`` by :func:`save_two_tower`, in eval mode."""
    path = folder / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE} (not a saved two-tower model)")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    raw = dict(meta["config"])
    raw["hidden"] = tuple(raw["hidden"])
    config = TwoTowerConfig(**raw)
    model = TwoTowerModel(
        config, _placeholder(meta["user_attributes"]), _placeholder(meta["item_attributes"])
    )
    state = torch.load(folder / WEIGHTS_FILE, weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model
