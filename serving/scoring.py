"""Reranker scores of encoded rows: the one ``predict`` that training, evaluation and serving call.

Lives in ``serving`` beside :mod:`serving.encoding` (the request path may not
import ``pipelines``); the training loop (:mod:`pipelines.ranker.loop`)
imports it from here, so a served score is computed exactly as a test metric.
"""

from __future__ import annotations

import numpy as np
import torch

from models.moe import FeatureBatch, Reranker
from serving.encoding import RankerPart


@torch.no_grad()
def predict(
    model: Reranker, part: RankerPart, task: str = "click", batch_size: int = 8192
) -> np.ndarray:
    """Logits (N,) float64 of ``task`` for every row of ``part``, in order (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    chunks = [
        model(to_device(part.batch(slice(start, start + batch_size)), device))
        .outputs[task]
        .double()
        .cpu()
        for start in range(0, len(part), batch_size)
    ]
    return torch.cat(chunks).numpy() if chunks else np.zeros(0)


def to_device(batch: FeatureBatch, device: torch.device) -> FeatureBatch:
    """``batch`` on ``device`` (the same object on CPU: no copy)."""
    if device.type == "cpu":
        return batch
    move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    return FeatureBatch(
        categorical=move(batch.categorical),
        hashed=move(batch.hashed),
        numeric=move(batch.numeric),
        sequences=tuple(s.to(device, non_blocking=True) for s in batch.sequences),
    )
