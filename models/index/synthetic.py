"""Seeded clustered embeddings that look like learned ones, for index tests and benchmarks.

Uniform random unit vectors are the hardest case for any ANN index (every
point is about as far as every other) and nothing like a trained two-tower's
embeddings, which bunch into genres and tastes. A Gaussian mixture on the
sphere is the usual stand-in: ``C`` centres drawn from ``N(0, I_D)``, each point
its centre plus ``spread`` times ``N(0, I_D)`` noise, then L2-normalised. With
``spread = 1`` a point's cosine to its centre is about 0.7 and to another
cluster's point about 0; queries drawn from the same mixture play the users.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Rows generated per step, so a 10M x 64 sample never holds a float64 copy.
_CHUNK = 1 << 18


@dataclass(frozen=True)
class EmbeddingMixture:
    """A Gaussian mixture on the unit sphere: ``centres`` (C, D) float32 and the noise ``spread``."""

    centres: np.ndarray
    spread: float = 1.0

    @classmethod
    def random(
        cls, n_clusters: int, dim: int, spread: float = 1.0, seed: int = 0
    ) -> EmbeddingMixture:
        if n_clusters <= 0 or dim <= 0 or spread < 0:
            raise ValueError(
                f"need n_clusters > 0, dim > 0, spread >= 0; got {n_clusters}, {dim}, {spread}"
            )
        rng = np.random.default_rng(seed)
        return cls(rng.standard_normal((n_clusters, dim), dtype=np.float32), float(spread))

    @property
    def dim(self) -> int:
        return int(self.centres.shape[1])

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``(n, D)`` float32 unit vectors, each from a uniformly chosen cluster."""
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.dim), dtype=np.float32)
        for start in range(0, n, _CHUNK):
            stop = min(start + _CHUNK, n)
            cluster = rng.integers(0, len(self.centres), stop - start)
            noise = rng.standard_normal((stop - start, self.dim), dtype=np.float32)
            block = self.centres[cluster] + self.spread * noise
            out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return out


def clustered_embeddings(
    n: int, dim: int, n_clusters: int | None = None, spread: float = 1.0, seed: int = 0
) -> np.ndarray:
    """``(n, D)`` float32 unit item vectors from a seeded mixture of ``n_clusters`` (default ``sqrt(n)``)."""
    clusters = n_clusters if n_clusters is not None else max(1, round(np.sqrt(n)))
    return EmbeddingMixture.random(clusters, dim, spread, seed).sample(n, seed + 1)
