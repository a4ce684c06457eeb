"""Sketch shapes from :class:`infra.config.SketchConfig`, error bounds, column checks, memory.

The config holds the user-facing knobs (``hll_lg_k``, ``cms_epsilon``, ...);
this module turns them into the exact DataSketches constructor arguments once,
so every builder, merger and the online path agree on the shapes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import datasketches as ds
import polars as pl

from infra.config import SketchConfig

# The only Count-Min seed whose sketches the Python binding can deserialise (see CmsConfig).
CMS_READABLE_SEED = 9001

HllType = Literal["HLL_4", "HLL_6", "HLL_8"]

# An explicit mapping, not getattr on a string: the config's Literal and this table
# must list the same names (a test checks it).
HLL_TYPES: dict[str, ds.tgt_hll_type] = {
    "HLL_4": ds.tgt_hll_type.HLL_4,
    "HLL_6": ds.tgt_hll_type.HLL_6,
    "HLL_8": ds.tgt_hll_type.HLL_8,
}


def hll_relative_standard_error(lg_k: int) -> float:
    """Relative standard error of an HLL estimate with ``2 ** lg_k`` buckets: 1.04 / sqrt(k).

    This is the classic HLL figure; the estimator used here (DataSketches'
    composite estimator, see :mod:`features.sketches.hll`) is at least this good
    once the sketch is in dense mode, and near-exact below that (sparse mode).
    """
    return 1.04 / math.sqrt(2**lg_k)


def cms_error_bound(epsilon: float, total_weight: float) -> float:
    """Count-Min overestimate bound ``epsilon * N`` (holds per item with probability 1 - delta).

    ``N`` is the sketch's total weight (the sum of all updates). The sketch never
    underestimates when every weight is non-negative.
    """
    return epsilon * total_weight


@dataclass(frozen=True)
class HllConfig:
    """HLL sketch shape: ``2 ** lg_k`` buckets of ``tgt_type`` (4, 6 or 8 bits each)."""

    lg_k: int = 10
    tgt_type: HllType = "HLL_4"

    def __post_init__(self) -> None:
        # DataSketches accepts 4..21; outside that the C++ constructor throws a bare error.
        if not 4 <= self.lg_k <= 21:
            raise ValueError(f"hll lg_k must be in 4..21, got {self.lg_k}")
        if self.tgt_type not in HLL_TYPES:
            raise ValueError(
                f"hll tgt_type must be one of {sorted(HLL_TYPES)}, got {self.tgt_type!r}"
            )

    @classmethod
    def from_settings(cls, settings: SketchConfig) -> HllConfig:
        return cls(lg_k=settings.hll_lg_k, tgt_type=settings.hll_type)

    @property
    def ds_type(self) -> ds.tgt_hll_type:
        return HLL_TYPES[self.tgt_type]

    @property
    def relative_standard_error(self) -> float:
        return hll_relative_standard_error(self.lg_k)

    @property
    def max_bytes(self) -> int:
        """Upper bound on one serialised sketch, whatever its count: the memory bound per entity.

        DataSketches' bound for the updatable form; the compact form we store is
        never larger (it drops the empty slots of sparse mode and of HLL_4's aux table).
        """
        return int(ds.hll_sketch.get_max_updatable_serialization_bytes(self.lg_k, self.ds_type))


@dataclass(frozen=True)
class CmsConfig:
    """Count-Min sketch shape: ``num_hashes`` rows of ``num_buckets`` counters, hashed with ``seed``.

    ``num_buckets = ceil(e / epsilon)``, ``num_hashes = ceil(ln(1 / delta))``: the
    textbook sizes (Cormode & Muthukrishnan), which give an overestimate of at
    most ``epsilon * N`` per item with probability ``1 - delta``. We compute them
    from the formula the config documents; ``count_min_sketch.suggest_num_buckets``
    / ``suggest_num_hashes`` use the same formula (a test checks they agree), so
    either would do, but the formula is the contract and does not move with the
    library version.
    """

    num_buckets: int
    num_hashes: int
    seed: int = CMS_READABLE_SEED
    # Kept for the error bound: the width gives epsilon' = e / num_buckets <= epsilon.
    epsilon: float = 1e-4
    delta: float = 0.01

    def __post_init__(self) -> None:
        if self.num_buckets < 1 or self.num_hashes < 1:
            raise ValueError(
                f"count-min needs >= 1 bucket and hash, got {self.num_buckets}, {self.num_hashes}"
            )
        # The Python binding's count_min_sketch.deserialize takes no seed and checks the
        # stored seed hash against the default one, so a sketch built with any other
        # seed can be written but never read back (nor merged or queried after storage).
        if self.seed != CMS_READABLE_SEED:
            raise ValueError(
                f"cms_seed {self.seed}: datasketches' Python deserialize only reads sketches "
                f"built with seed {CMS_READABLE_SEED}; keep features.sketches.cms_seed at it"
            )

    @classmethod
    def from_error(cls, epsilon: float, delta: float, seed: int = CMS_READABLE_SEED) -> CmsConfig:
        if not (0.0 < epsilon < 1.0 and 0.0 < delta < 1.0):
            raise ValueError(f"epsilon and delta must be in (0, 1), got {epsilon}, {delta}")
        return cls(
            num_buckets=math.ceil(math.e / epsilon),
            num_hashes=math.ceil(math.log(1.0 / delta)),
            seed=seed,
            epsilon=epsilon,
            delta=delta,
        )

    @classmethod
    def from_settings(cls, settings: SketchConfig) -> CmsConfig:
        return cls.from_error(settings.cms_epsilon, settings.cms_delta, settings.cms_seed)

    @property
    def max_bytes(self) -> int:
        """Bytes of one non-empty serialised sketch (every counter is stored; empty is a header)."""
        probe = ds.count_min_sketch(self.num_hashes, self.num_buckets, self.seed)
        probe.update(0)
        return int(probe.get_serialized_size_bytes())

    def error_bound(self, total_weight: float) -> float:
        return cms_error_bound(self.epsilon, total_weight)


def as_hll_config(config: HllConfig | SketchConfig) -> HllConfig:
    return config if isinstance(config, HllConfig) else HllConfig.from_settings(config)


def as_cms_config(config: CmsConfig | SketchConfig) -> CmsConfig:
    return config if isinstance(config, CmsConfig) else CmsConfig.from_settings(config)


def require_columns(frame: pl.DataFrame, columns: Iterable[str], what: str) -> None:
    """Raise ``ColumnNotFoundError`` naming the first missing column and the ones present."""
    for name in columns:
        if name not in frame.columns:
            raise pl.exceptions.ColumnNotFoundError(
                f"{what}: column {name!r} not found; the frame has {frame.columns}"
            )


def require_integer(frame: pl.DataFrame, column: str, what: str) -> None:
    """Sketch keys must be integers: DataSketches hashes int 1 and float 1.0 differently,
    so a float id in one path and an int in another would silently count twice."""
    dtype = frame.schema[column]
    if not dtype.is_integer():
        raise TypeError(f"{what}: column {column!r} must hold integer ids, got {dtype}")


@dataclass(frozen=True)
class SketchMemory:
    """Serialised bytes of one sketch column: per entity (mean, max) and in all."""

    entities: int
    mean_bytes: float
    max_bytes: int
    total_bytes: int


def sketch_memory(frame: pl.DataFrame, column: str) -> SketchMemory:
    """Bytes of the serialised sketches in ``column`` (``pl.Binary``), per entity and in total.

    Nulls (no sketch) count as 0 bytes. Compare ``max_bytes`` with
    :attr:`HllConfig.max_bytes`: memory per entity is bounded by the config.
    """
    require_columns(frame, [column], "sketch_memory")
    if frame.height == 0:
        return SketchMemory(entities=0, mean_bytes=0.0, max_bytes=0, total_bytes=0)
    sizes = frame.select(pl.col(column).bin.size().fill_null(0).cast(pl.Int64)).to_series()
    total = int(sizes.sum())
    return SketchMemory(
        entities=frame.height,
        mean_bytes=total / frame.height,
        max_bytes=int(sizes.max()),  # type: ignore[arg-type]
        total_bytes=total,
    )
