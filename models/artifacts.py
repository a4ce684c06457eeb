"""Save and load trained models as plain files (no pickled classes).

Layout of a model folder::

    two_tower.json   TwoTowerConfig + the shapes of both attribute tables
    two_tower.pt     the state dict (weights and attribute buffers), tensors only
    item_encoding.json  how item attributes were encoded (vocabularies, statistics):
                     what encodes items that arrive after training for their
                     content-only vectors; absent for a model without item attributes

Loading rebuilds the network from the JSON and loads the tensors with
``weights_only=True``, so a model file cannot run code, and the files load in
any process that has this package (MLflow's model wrapper, serving replicas).
A reranker folder holds ``reranker.json`` (RerankerConfig + FeatureLayout),
``reranker.pt`` and, when one was fitted, ``calibration.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from features.encoding import AttributeEncoding, AttributeTable
from models.calibration import IsotonicCalibration, TemperatureScaling, calibration_from_dict
from models.moe import FeatureLayout, Reranker, RerankerConfig, SequenceColumn
from models.two_tower import AttributeEncoder, TwoTowerConfig, TwoTowerModel

CONFIG_FILE = "two_tower.json"
WEIGHTS_FILE = "two_tower.pt"
ITEM_ENCODING_FILE = "item_encoding.json"
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


def save_item_encoding(encoding: AttributeEncoding, folder: Path) -> None:
    """Write the item attribute encoding beside a model saved in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ITEM_ENCODING_FILE).write_text(json.dumps(encoding.to_dict(), indent=2))


def load_item_encoding(folder: Path) -> AttributeEncoding | None:
    """The item attribute encoding saved beside the model in ``folder``; None when absent."""
    path = folder / ITEM_ENCODING_FILE
    if not path.exists():
        return None
    return AttributeEncoding.from_dict(json.loads(path.read_text()))


def _read_meta(path: Path, what: str) -> dict[str, Any]:
    """The JSON beside a saved model's tensors, checked to be of this code's format."""
    if not path.exists():
        raise FileNotFoundError(f"{path.parent}: no {path.name} (not {what})")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    return meta


def load_two_tower(folder: Path) -> TwoTowerModel:
    """The model saved in ``folder`` by :func:`save_two_tower`, in eval mode."""
    meta = _read_meta(folder / CONFIG_FILE, "a saved two-tower model")
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


# --------------------------------------------------------------------------- reranker

RERANKER_CONFIG_FILE = "reranker.json"
RERANKER_WEIGHTS_FILE = "reranker.pt"
CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class SavedReranker:
    """A loaded reranker (eval mode) and the calibrator fitted beside it, if any."""

    model: Reranker
    calibrator: TemperatureScaling | IsotonicCalibration | None


def save_reranker(
    model: Reranker,
    folder: Path,
    calibrator: TemperatureScaling | IsotonicCalibration | None = None,
) -> None:
    """Write ``model`` (config, layout, tensors) and its calibrator into ``folder``.

    The LoRA adapters must be merged first (:func:`models.lora.merge_lora`):
    the saved state has the base architecture's keys.
    """
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "config": asdict(model.config),
        "layout": asdict(model.layout),
    }
    torch.save(model.state_dict(), folder / RERANKER_WEIGHTS_FILE)
    (folder / RERANKER_CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    if calibrator is not None:
        (folder / CALIBRATION_FILE).write_text(json.dumps(calibrator.to_dict(), indent=2))


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the frozen configs hold."""
    return tuple(value) if isinstance(value, list) else value


def load_reranker(folder: Path) -> SavedReranker:
    """The reranker saved in ``folder`` by :func:`save_reranker`, in eval mode."""
    meta = _read_meta(folder / RERANKER_CONFIG_FILE, "a saved reranker")
    config = RerankerConfig(**{k: _tuples(v) for k, v in meta["config"].items()})
    raw = meta["layout"]
    layout = FeatureLayout(
        categorical=tuple(raw["categorical"]),
        hashed=tuple(raw["hashed"]),
        numeric=int(raw["numeric"]),
        sequences=tuple(SequenceColumn(**s) for s in raw["sequences"]),
    )
    model = Reranker(layout, config)
    model.load_state_dict(torch.load(folder / RERANKER_WEIGHTS_FILE, weights_only=True))
    model.eval()
    calibration = folder / CALIBRATION_FILE
    calibrator = (
        calibration_from_dict(json.loads(calibration.read_text())) if calibration.exists() else None
    )
    return SavedReranker(model, calibrator)
