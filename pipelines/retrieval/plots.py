"""Plots of a retrieval run, as PNG files (logged to MLflow by the register step)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt


def plot_history(history: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Training loss and validation recall per epoch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = [int(h["epoch"]) for h in history]
    fig, loss_axis = plt.subplots(figsize=(6, 4))
    loss_axis.plot(epochs, [h["loss"] for h in history], marker="o", color="tab:blue")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    recall_keys = sorted(k for k in history[0] if k.startswith("valid_recall@")) if history else []
    if recall_keys:
        recall_axis = loss_axis.twinx()
        key = recall_keys[0]
        recall_axis.plot(epochs, [h[key] for h in history], marker="s", color="tab:orange")
        recall_axis.set_ylabel(key.replace("_", " "), color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_recall_at_k(
    models: Mapping[str, Mapping[str, float]], ks: Sequence[int], path: Path
) -> None:
    """Recall@K against K for each model (test split, full ranking)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axis = plt.subplots(figsize=(6, 4))
    for name, metrics in models.items():
        axis.plot(list(ks), [metrics[f"recall@{k}"] for k in ks], marker="o", label=name)
    axis.set_xscale("log")
    axis.set_xlabel("K")
    axis.set_ylabel("recall@K (test)")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
