"""The typed feature spec: declared once, saved beside every model.

Models, serving and drift checks read the same spec, so training and serving
cannot disagree about a feature's kind, vocabulary or normalisation.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from infra.storage import StoragePath

SPEC_FILE = "feature_spec.json"


class FeatureKind(StrEnum):
    CATEGORICAL = "categorical"
    NUMERIC = "numeric"
    SEQUENCE = "sequence"
    EMBEDDING = "embedding"


class Entity(StrEnum):
    USER = "user"
    ITEM = "item"
    CONTEXT = "context"
    # A row of a generic CTR table (Criteo/Avazu) that has no user or item.
    EXAMPLE = "example"


class Normalization(StrEnum):
    NONE = "none"
    STANDARD = "standard"  # (x - mean) / std
    LOG1P = "log1p"  # sign(x) * log1p(|x|): counts with heavy tails (Criteo I1–I13)
    MINMAX = "minmax"


class DriftRole(StrEnum):
    """How drift monitoring treats a feature (:func:`monitoring.columns.judged_columns`).

    Only ``reference`` features are compared with the reference profile: the
    others move with time by construction, so a test on them flags every window
    of a healthy log (on the tiny world 49 of 57 features did before the roles).
    """

    REFERENCE = "reference"
    # Moves with the log's or the entity's age: lifetime counts, rates and
    # distinct counts, seconds since first or last seen, item age. Windowed
    # counts carry the same behaviour and are judged.
    GROWING = "growing"
    # An entity id: which users and items a window holds is the sketch checks' job
    # (DAU from HLL, the popularity head from Count-Min), not a per-column test.
    IDENTIFIER = "identifier"
    # A calendar field with a weekly cycle: a window shorter than a week holds only
    # some of its values, so it is judged only on windows of 7 days or more.
    CALENDAR = "calendar"


class Feature(BaseModel):
    """One feature: what it is, where it lives, and how to encode it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: FeatureKind
    entity: Entity
    dtype: Literal["int64", "float64", "string", "list[int64]", "list[float64]"]
    # categorical: either a vocabulary (index 0 is out-of-vocabulary) or hash buckets.
    vocabulary: tuple[str, ...] | None = None
    hash_buckets: int | None = Field(default=None, ge=1)
    normalization: Normalization = Normalization.NONE
    # Statistics for normalisation, measured on the training split.
    mean: float | None = None
    std: float | None = None
    min_value: float | None = None
    max_value: float | None = None
    # sequence: how many most-recent values are kept; embedding: vector width.
    max_length: int | None = Field(default=None, ge=1)
    dim: int | None = Field(default=None, ge=1)
    description: str = ""
    drift: DriftRole = DriftRole.REFERENCE
    # A count over the last ``warmup_days`` days: its distribution is stationary
    # only where the log is at least that old (younger rows saw a partial window).
    warmup_days: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check_kind(self) -> Feature:
        if self.kind == FeatureKind.CATEGORICAL and (self.vocabulary is None) == (
            self.hash_buckets is None
        ):
            raise ValueError(
                f"categorical feature {self.name!r} needs exactly one of vocabulary or hash_buckets"
            )
        if self.kind == FeatureKind.SEQUENCE and self.max_length is None:
            raise ValueError(f"sequence feature {self.name!r} needs max_length")
        if self.kind == FeatureKind.EMBEDDING and self.dim is None:
            raise ValueError(f"embedding feature {self.name!r} needs dim")
        if self.normalization == Normalization.STANDARD and (self.mean is None or not self.std):
            raise ValueError(
                f"standard-normalised feature {self.name!r} needs mean and a non-zero std"
            )
        return self

    @property
    def cardinality(self) -> int:
        """Embedding rows a categorical feature needs (OOV row included)."""
        if self.vocabulary is not None:
            return len(self.vocabulary) + 1
        if self.hash_buckets is not None:
            return self.hash_buckets
        raise ValueError(f"{self.name!r} is not categorical")


class FeatureSpec(BaseModel):
    """All features of one dataset/model, plus the label column(s)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 1
    # The click label (0/1) first; then any second-task targets (e.g. ``rating``),
    # which later events fill: never features, null where a row has none.
    labels: tuple[str, ...] = Field(default=("label",), min_length=1)
    features: tuple[Feature, ...]
    # True when the table's categorical columns already hold vocabulary codes
    # (index + 1, 0 = out of vocabulary), as CTR tables do; False: raw values.
    encoded: bool = False

    @model_validator(mode="after")
    def _unique(self) -> FeatureSpec:
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate feature names: {dupes}")
        return self

    def __getitem__(self, name: str) -> Feature:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(f"feature spec has no feature {name!r}")

    def of_kind(self, kind: FeatureKind) -> list[Feature]:
        return [f for f in self.features if f.kind == kind]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def save(self, folder: StoragePath) -> StoragePath:
        path = folder.join(SPEC_FILE)
        path.write_text_atomic(json.dumps(self.model_dump(mode="json"), indent=2))
        return path

    @classmethod
    def load(cls, folder: StoragePath) -> FeatureSpec:
        return cls.model_validate_json(folder.join(SPEC_FILE).read_text())
