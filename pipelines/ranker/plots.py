"""Plots of a reranker run, as PNG files (logged to MLflow by the register step)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt
import numpy as np

from models.ctr_metrics import ReliabilityTable


def plot_history(history: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Training loss and validation AUC per epoch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = [int(h["epoch"]) for h in history]
    fig, loss_axis = plt.subplots(figsize=(6, 4))
    loss_axis.plot(epochs, [h["train_loss"] for h in history], marker="o", color="tab:blue")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training logloss", color="tab:blue")
    auc_axis = loss_axis.twinx()
    auc_axis.plot(epochs, [h["valid_auc"] for h in history], marker="s", color="tab:orange")
    auc_axis.set_ylabel("validation AUC", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(tables: Mapping[str, ReliabilityTable], path: Path) -> None:
    """Observed click rate against mean predicted probability per bin, one line per model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axis = plt.subplots(figsize=(5, 5))
    high = 0.0
    for name, table in tables.items():
        filled = table.count > 0
        axis.plot(
            table.mean_prediction[filled], table.observed_rate[filled], marker="o", label=name
        )
        high = max(high, float(np.nanmax(table.mean_prediction[filled], initial=0.0)))
    high = min(1.0, max(0.05, high * 1.1))
    axis.plot([0, high], [0, high], linestyle="--", color="grey", label="perfect")
    axis.set_xlabel("mean predicted click probability")
    axis.set_ylabel("observed click rate")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
