"""The one typed configuration tree, its presets and its override rules.

Precedence, lowest first: model defaults < preset YAML < ``RAYREC_…`` environment
variables < ``--set a.b=c`` overrides. The YAML key, the CLI path and the
Python argument are the same dotted string (``simulator.n_users``); the
environment spelling joins the parts with ``__`` (``RAYREC_SIMULATOR__N_USERS``).
Unknown keys are an error that names the key, wherever they come from.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from infra.errors import ConfigError

ENV_PREFIX = "RAYREC_"
ENV_NESTED_DELIMITER = "__"
PRESETS = ("tiny", "default", "large")


class Section(BaseModel):
    """Base of every config section: frozen, and unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- runtime


class PathsConfig(Section):
    # A local folder or an object-store URI (s3://, gs://); every output lives below it.
    workdir: str = "workdir"


class RayConfig(Section):
    # None: start a local Ray; RAY_ADDRESS in the environment wins over this.
    address: str | None = None
    # None lets Ray count the machine's cores.
    num_cpus: int | None = None
    # Small by default: the laptop also runs MLflow, Polars and the tests.
    object_store_memory_mb: int | None = 512
    include_dashboard: bool = False


class MlflowConfig(Section):
    # None: SQLite at <workdir>/mlflow/mlflow.db, so `make run` needs no server.
    tracking_uri: str | None = None
    # None: <workdir>/mlflow/artifacts for local workdirs.
    artifact_location: str | None = None
    experiment: str = "rayrec"


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # console: human-readable; json: one JSON object per line, for log shippers.
    format: Literal["console", "json"] = "console"
    # auto: progress bars on a terminal, off in CI (CI=true) and in pipes.
    progress: Literal["auto", "on", "off"] = "auto"


# --------------------------------------------------------------------------- data


class DriftEventConfig(Section):
    """A change of the simulated world that starts on ``day`` (0-based) and stays."""

    kind: Literal["covariate", "concept", "popularity_shock"]
    day: int = Field(ge=0)
    # covariate: share of traffic from the new user segment (which also adds
    # round(strength * world_size.n_users) users, at least one); concept: rotation
    # of user preferences in radians / (pi/2); popularity_shock: share of items boosted.
    strength: float = Field(default=0.5, gt=0.0, le=1.0)
    # popularity_shock only: multiplier on the boosted items' popularity weight.
    boost: float = Field(default=20.0, gt=1.0)


@dataclass(frozen=True)
class WorldSize:
    """The simulated world's effective sizes: the base sizes times ``scale``."""

    n_users: int
    n_items: int
    impressions_per_day: int


class SimulatorConfig(Section):
    """Click-log simulator; the defaults are the `default` preset's world.

    ``n_users``, ``n_items`` and ``impressions_per_day`` are the world at
    ``scale`` 1; what the simulator builds is :attr:`world_size`, read by every
    consumer (never the base fields). The scaled sizes are derived, not written
    back: the resolved config (logged to MLflow, reloaded by
    ``model_validate_json``) keeps ``scale`` and the base sizes, so a dump and
    reload scales exactly once, and the knob and the sizes each have one home.
    """

    seed: int = 7
    n_users: int = Field(default=20_000, ge=1)
    n_items: int = Field(default=5_000, ge=2)
    n_days: int = Field(default=28, ge=1)
    start_date: dt.date = dt.date(2026, 1, 1)
    # Impressions (slate positions shown) per day at scale 1.
    impressions_per_day: int = Field(default=60_000, ge=1)
    # The size knob: multiplies n_users, n_items and impressions_per_day (see
    # world_size), so events grow by ~scale and each user's and item's activity
    # stays the same. On the default world 15 gives ~26M events, 300k users and
    # 75k items; fractions shrink it (0.05: a smoke run).
    scale: float = Field(default=1.0, gt=0.0)
    # Share of the catalogue live on day 0; the rest arrives evenly (cold-start items).
    initial_item_fraction: float = Field(default=0.8, gt=0.0, le=1.0)
    latent_dim: int = Field(default=16, ge=2)
    # Share of preference variance explained by attributes, so features carry signal.
    attribute_share: float = Field(default=0.6, ge=0.0, le=1.0)
    n_user_segments: int = Field(default=6, ge=1)
    n_item_categories: int = Field(default=20, ge=1)
    # Zipf exponent of item popularity (~1 in most logs).
    zipf_exponent: float = Field(default=1.0, gt=0.0)
    # Pareto shape of user activity: smaller means heavier tail.
    activity_pareto_shape: float = Field(default=1.2, gt=0.0)
    mean_session_requests: float = Field(default=3.0, ge=1.0)
    # Mean seconds between requests of one session (exponential gaps), and between
    # a click and its rating: "seconds to minutes apart".
    mean_request_gap_s: float = Field(default=30.0, gt=0.0)
    slate_size: int = Field(default=10, ge=1)
    # Candidates the logging policy draws before ordering them into a slate.
    candidate_pool: int = Field(default=30, ge=1)
    # P(examine | position p) = 1 / (1 + p) ** examine_decay, p = 0 at the top.
    examine_decay: float = Field(default=0.8, ge=0.0)
    # Logit of relevance = scale * <u, v> + quality term + bias. These give a feed-like
    # log on the default world: ~10% overall CTR, ~34% at the top slot, ~4% at the tenth.
    relevance_scale: float = Field(default=3.0, gt=0.0)
    relevance_bias: float = -5.0
    # Logit of relevance per unit of item quality (quality ~ N(0, 1)): a popularity-free
    # item effect that an item-only model can learn.
    quality_weight: float = Field(default=0.5, ge=0.0)
    # Logging policy: score = log popularity + personalization * noisy affinity,
    # sampled with softmax exploration at this temperature.
    policy_personalization: float = Field(default=2.0, ge=0.0)
    policy_temperature: float = Field(default=1.0, gt=0.0)
    # Std of the per-user error of the policy's preference estimate (in units of the
    # true vectors' per-component std); the estimate is never refreshed, so concept
    # drift makes the logging policy stale, as a deployed model would be.
    policy_affinity_noise: float = Field(default=0.5, ge=0.0)
    # Candidate draw weight = popularity * exp(tilt * segment-category affinity);
    # 0 draws candidates by popularity alone.
    policy_category_tilt: float = Field(default=1.0, ge=0.0)
    # Share of clicks followed by an explicit rating event.
    rating_probability: float = Field(default=0.3, ge=0.0, le=1.0)
    # Rows generated and written per chunk; bounds memory at any size.
    chunk_rows: int = Field(default=1_000_000, ge=1_000)
    # Parquet codec of the written events (benchmarks/simulator.py measures both).
    compression: Literal["zstd", "snappy"] = "zstd"
    drifts: tuple[DriftEventConfig, ...] = ()

    @property
    def world_size(self) -> WorldSize:
        """Users, items and impressions per day of the world built: base sizes x ``scale``.

        Rounded, and kept at the base fields' own lower bounds (1 user, 2 items,
        1 impression a day) so a small scale still makes a valid world.
        """
        return WorldSize(
            n_users=max(1, round(self.n_users * self.scale)),
            n_items=max(2, round(self.n_items * self.scale)),
            impressions_per_day=max(1, round(self.impressions_per_day * self.scale)),
        )

    @property
    def n_initial_items(self) -> int:
        """Items live on day 0 (ids 0 .. n_initial_items - 1)."""
        n_items = self.world_size.n_items
        return min(n_items, max(1, round(n_items * self.initial_item_fraction)))

    @model_validator(mode="after")
    def _check(self) -> SimulatorConfig:
        if self.candidate_pool < self.slate_size:
            raise ValueError("candidate_pool must be >= slate_size")
        if self.candidate_pool > self.n_initial_items:
            raise ValueError(
                f"candidate_pool {self.candidate_pool} exceeds the {self.n_initial_items} "
                "items live on day 0"
            )
        if 2 * self.slate_size > self.chunk_rows:
            raise ValueError("chunk_rows must hold at least one slate and its ratings")
        for drift in self.drifts:
            if drift.day >= self.n_days:
                raise ValueError(
                    f"drift on day {drift.day} is after the last day {self.n_days - 1}"
                )
        if sum(d.strength for d in self.drifts if d.kind == "covariate") > 1.0:
            raise ValueError("covariate drifts' traffic shares (strength) sum to more than 1")
        return self


class SimulatorSourceConfig(Section):
    kind: Literal["simulator"] = "simulator"


class MovieLensSourceConfig(Section):
    kind: Literal["movielens"] = "movielens"
    # A folder in any MovieLens layout (100K, 1M/10M, latest/25M).
    path: str
    # Explicit ratings become implicit labels: label = rating >= this.
    positive_threshold: float = 4.0


class CtrSourceConfig(Section):
    kind: Literal["criteo", "avazu"]
    # A file (or folder of files) in the Kaggle layout of that dataset.
    path: str
    # Categorical values seen fewer times than this map to the out-of-vocabulary id.
    min_category_count: int = Field(default=2, ge=1)


class InteractionFilesSourceConfig(Section):
    kind: Literal["files"] = "files"
    path: str
    format: Literal["csv", "parquet", "user_item_lines"] = "csv"
    # canonical column -> column in the file (user_id, item_id, ts, label, value, ...).
    columns: dict[str, str] = Field(default_factory=dict)
    # How to read `ts`: unix seconds, milliseconds or ISO-8601 strings.
    ts_unit: Literal["s", "ms", "iso"] = "s"
    separator: str = ","
    # Event type of rows when `columns` maps no event_type: logs of interactions are clicks.
    event_type: Literal["impression", "click", "rating", "purchase", "view"] = "click"


class RecBoleSourceConfig(Section):
    kind: Literal["recbole"] = "recbole"
    # Folder with <name>.inter and optionally <name>.user / <name>.item.
    path: str
    dataset: str | None = None
    # With a rating field and no label field: label = rating >= this (as for MovieLens).
    positive_threshold: float = 4.0


SourceConfig = Annotated[
    SimulatorSourceConfig
    | MovieLensSourceConfig
    | CtrSourceConfig
    | InteractionFilesSourceConfig
    | RecBoleSourceConfig,
    Field(discriminator="kind"),
]


class ValidationConfig(Section):
    # The step fails (and publishes nothing) above this share of bad rows.
    max_bad_fraction: float = Field(default=0.01, ge=0.0, le=1.0)
    # Timestamps outside [ts_min, now + max_future_skew] are quarantined.
    ts_min: dt.datetime = dt.datetime(1990, 1, 1, tzinfo=dt.UTC)
    max_future_skew_hours: float = Field(default=24.0, ge=0.0)


class DataConfig(Section):
    source: SourceConfig = SimulatorSourceConfig()
    # Also ingest serving's event log (serving.event_log): the events the live API
    # took in (POST /v1/events) join the source's, so a retrain learns from what
    # was served. Off by default: `make run` stays a function of its source.
    include_event_log: bool = False
    validation: ValidationConfig = ValidationConfig()


class SketchConfig(Section):
    """Apache DataSketches sizes; memory per entity is bounded by these."""

    # HLL: relative standard error ~ 1.04 / sqrt(2 ** lg_k); 10 -> ~3.3% in <= 512 B (HLL_4).
    hll_lg_k: int = Field(default=10, ge=4, le=21)
    # HLL_4 is the most compact serialised form (4 bits a bucket); HLL_8 updates fastest.
    hll_type: Literal["HLL_4", "HLL_6", "HLL_8"] = "HLL_4"
    # Count-Min: overestimate <= epsilon * N with probability 1 - delta, with
    # width = ceil(e / epsilon) buckets and depth = ceil(ln(1 / delta)) hashes.
    cms_epsilon: float = Field(default=1e-4, gt=0.0, lt=1.0)
    cms_delta: float = Field(default=0.01, gt=0.0, lt=1.0)
    cms_seed: int = 9001


class OnlineStoreConfig(Section):
    kind: Literal["sqlite", "redis"] = "sqlite"
    # sqlite: a file path (None: <workdir>/online/features.sqlite); redis: redis://host:port/db.
    url: str | None = None
    # Seconds before a read or write gives up and the caller gets defaults.
    timeout_s: float = Field(default=0.05, gt=0.0)
    key_prefix: str = "rayrec"


class FeaturesConfig(Section):
    """Feature transforms, sketches and stores (the `features` steps)."""

    engine: Literal["polars", "ray"] = "polars"
    # Rolling windows, in whole UTC days up to the row's time (see features.aggregates).
    windows_days: tuple[int, ...] = (1, 7, 30)
    # Beta prior for smoothed CTR: (clicks + s * p0) / (impressions + s), p0 the global rate.
    ctr_prior_strength: float = Field(default=20.0, ge=0.0)
    # Length of the recent-items sequence feature (the two-tower's user history).
    history_length: int = Field(default=20, ge=1)
    # Entity partitions of the polars engine's point-in-time build (features.build):
    # one user (then item) partition at a time, spilled to disk, so peak memory
    # follows 1/P of the log. auto: ceil(events / events_per_partition), counted
    # from the Parquet footers; any P gives the same output.
    partitions: int | Literal["auto"] = Field(default="auto")
    # auto's bound. 2M keeps the default world (1.7M events) in one partition, the
    # fastest; a 26M-event log gets 13 partitions, each about the default's size.
    events_per_partition: int = Field(default=2_000_000, ge=1)
    sketches: SketchConfig = SketchConfig()
    online_store: OnlineStoreConfig = OnlineStoreConfig()

    @model_validator(mode="after")
    def _check(self) -> FeaturesConfig:
        if not self.windows_days or any(w < 1 for w in self.windows_days):
            raise ValueError("windows_days must list positive day counts")
        if list(self.windows_days) != sorted(set(self.windows_days)):
            raise ValueError("windows_days must be increasing and distinct")
        return self


# --------------------------------------------------------------------------- models


class IndexConfig(Section):
    """The candidate index (models.index): exact below a size, Faiss above it."""

    kind: Literal["auto", "exact", "hnsw", "ivf"] = "auto"
    # auto: exact search up to this many items (brute force is < 1 ms there).
    exact_max_items: int = Field(default=50_000, ge=0)
    # auto: IVF with refinement from this many items (HNSW's memory and build time grow).
    ivf_min_items: int = Field(default=5_000_000, ge=1)
    # HNSW graph degree, insert breadth and search breadth (keep ef_search >= the k served).
    # Measured at 200k x 64 (benchmarks/ann.py): M=16/efC=100 builds 2.6x faster than
    # M=32/efC=200, with half the graph memory, for the same recall at equal latency.
    hnsw_m: int = Field(default=16, ge=4)
    hnsw_ef_construction: int = Field(default=100, ge=8)
    hnsw_ef_search: int = Field(default=128, ge=1)
    # IVF lists (None: 4 * sqrt(n)), lists probed, and exact re-ranking of factor * k candidates.
    ivf_nlist: int | None = Field(default=None, ge=1)
    ivf_nprobe: int = Field(default=32, ge=1)
    refine_factor: int = Field(default=4, ge=1)
    # Self-check: recall@K of the index against exact search on this many sampled queries.
    recall_sample: int = Field(default=500, ge=1)
    recall_k: int = Field(default=100, ge=1)


class SplitConfig(Section):
    """How interactions split into train / valid / test (features.splits)."""

    # random: RecBole's per-user random ordering split by `ratios`; temporal: global time
    # cuts with valid/test shares ratios[1], ratios[2]; leave_last_out: last -> test,
    # second last -> valid; given: fixed files (features.splits.given_split).
    kind: Literal["temporal", "leave_last_out", "random", "given"] = "random"
    # train, valid, test shares (RecBole's default 8:1:1).
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if any(r <= 0 for r in self.ratios):
            raise ValueError(f"ratios must be positive, got {self.ratios}")
        if abs(sum(self.ratios) - 1.0) > 1e-9:
            raise ValueError(f"ratios must sum to 1, got {self.ratios} (sum {sum(self.ratios)})")
        return self


class RetrievalConfig(Section):
    """The retrieval model (models.two_tower), its task and its Ray Train loop.

    Defaults were chosen on MovieLens-100K's validation split (RecBole protocol).
    """

    # two_tower: ids + history + attributes through MLP towers; mf: matrix
    # factorisation (user and item id embeddings, dot product) in the same code path.
    kind: Literal["two_tower", "mf"] = "two_tower"
    embedding_dim: int = Field(default=64, ge=1)
    # Recent training items pooled into the user vector.
    history_length: int = Field(default=100, ge=1)
    hidden: tuple[int, ...] = (256,)
    attribute_dim: int = Field(default=16, ge=1)
    # Dropout in the tower MLPs: without it the user id embedding memorises in ~6 epochs.
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    item_id_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    use_user_id: bool = True
    use_attributes: bool = True
    # Softmax temperature of the in-batch loss (cosine logits / temperature).
    temperature: float = Field(default=0.08, gt=0.0)
    logq_correction: bool = True
    # Extra uniform negatives shared by a batch, and hard negatives per row from the index.
    uniform_negatives: int = Field(default=0, ge=0)
    hard_negatives: int = Field(default=0, ge=0)
    # Hard negatives are drawn from each user's top ``hard_negative_pool`` index
    # results (training items excluded); the very top is often unlabelled positives.
    hard_negative_pool: int = Field(default=50, ge=1)
    batch_size: int = Field(default=1024, ge=2)
    epochs: int = Field(default=30, ge=1)
    learning_rate: float = Field(default=0.003, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    # Early stopping: epochs without a better validation recall@eval_k.
    patience: int = Field(default=3, ge=1)
    eval_k: int = Field(default=10, ge=1)
    # Ray Train: workers, GPUs when present, bf16/fp16 autocast on GPU, retries of a crashed worker.
    workers: int = Field(default=1, ge=1)
    # Each worker reads its Ray Data shard into memory once and reshuffles it
    # each epoch (16 bytes a pair); false streams it through a shuffle buffer.
    cache_shard: bool = True
    # CPUs Ray reserves per worker, and its torch threads; None: the cluster's
    # CPUs split evenly between the workers (all cores for one local worker);
    # below 1 packs several workers on a small machine.
    cpus_per_worker: float | None = Field(default=None, gt=0.0)
    use_gpu: bool = False
    mixed_precision: bool = True
    max_failures: int = Field(default=2, ge=0)
    seed: int = 0
    # MLflow registry: the model name, and the test metric a challenger must beat to be champion.
    registered_model: str = "rayrec-retrieval"
    gate_metric: str = "recall@10"


class SearchDimension(Section):
    """One hyper-parameter of a Ray Tune search: a range or a list of values."""

    kind: Literal["loguniform", "uniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: tuple[float | int | str | bool, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> SearchDimension:
        if self.kind == "choice":
            if not self.values:
                raise ValueError("a choice dimension needs values")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(
                f"a {self.kind} dimension needs low < high, got {self.low}, {self.high}"
            )
        elif self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"a loguniform dimension needs low > 0, got {self.low}")
        elif self.kind == "int" and not (
            float(self.low).is_integer() and float(self.high).is_integer()
        ):
            raise ValueError(f"an int dimension needs whole bounds, got {self.low}, {self.high}")
        return self


def _default_search_space() -> dict[str, SearchDimension]:
    # Ranges around the ML-100K optimum (lr 3e-3, dim 16, 8 experts top-2).
    return {
        "learning_rate": SearchDimension(kind="loguniform", low=3e-4, high=3e-2),
        "embedding_dim": SearchDimension(kind="choice", values=(8, 16, 32)),
        "n_experts": SearchDimension(kind="choice", values=(4, 8, 16)),
        "top_k": SearchDimension(kind="choice", values=(1, 2)),
        "batch_size": SearchDimension(kind="choice", values=(512, 1024, 2048)),
        "weight_decay": SearchDimension(kind="choice", values=(0.0, 1e-6, 1e-5)),
        # ``finetune.lora_rank`` is a valid key too, but a trial trains the base
        # model without adapters: in this space it would be a dimension that
        # changes nothing, so the default leaves it out.
    }


class RankerTuningConfig(Section):
    """Ray Tune over the reranker: ASHA stops weak trials early, Optuna's TPE proposes the next."""

    # Off in `tiny` (seconds matter), bounded in `default`.
    enabled: bool = False
    trials: int = Field(default=16, ge=1)
    # Wall-time budget of the whole search; trials still running are stopped.
    max_wall_s: float = Field(default=1800.0, gt=0.0)
    # Trials at once; each takes ``cpus_per_trial`` CPUs.
    max_concurrent: int = Field(default=1, ge=1)
    cpus_per_trial: float = Field(default=1.0, gt=0.0)
    # ASHA: no trial is stopped before grace_period epochs; rungs keep the top
    # 1/reduction_factor. The longest a trial runs is models.ranker.epochs.
    asha: bool = True
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: int = Field(default=3, ge=2)
    # Trials train on at most this many training rows (a seeded sample, held in
    # each trial's memory) and validate on at most a tenth of it: a search ranks
    # configs, and on 2 cores the whole default log lets one trial use the whole
    # budget. Always a bound: trials do not stream, so it is what bounds them.
    max_train_rows: int = Field(default=200_000, ge=1)
    # Keys are models.ranker fields (``finetune.lora_rank`` for the nested one).
    space: dict[str, SearchDimension] = Field(default_factory=_default_search_space)
    seed: int = 0


class RankerFinetuneConfig(Section):
    """LoRA fine-tuning of the champion reranker on a recent window (base frozen, then merged)."""

    # Days before the newest event that make up the fine-tuning window.
    window_days: int = Field(default=1, ge=1)
    lora_rank: int = Field(default=8, ge=1)
    # Scale alpha / rank of the update (Hu et al. use alpha = 2 · rank).
    lora_alpha: float = Field(default=16.0, gt=0.0)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Which linear layers get adapters: expert MLPs, task heads, gates.
    targets: tuple[Literal["experts", "heads", "gates", "dense"], ...] = ("experts", "heads")
    # The adapters start at zero, so a larger learning rate than training is safe.
    learning_rate: float = Field(default=0.01, gt=0.0)
    epochs: int = Field(default=5, ge=1)


class SecondTaskConfig(Section):
    """The reranker's second task: its own gate over the shared experts and its own head.

    ``target`` names a label column of the examples after the click (the
    feature spec's ``labels``): ``rating`` is filled by the rating event of the
    same user, item and slate (the simulator, serving) or is the rating itself
    (MovieLens). ``regression`` fits the value (mean squared error, rows with
    a value only); ``binary`` learns ``value >= threshold`` (long engagement:
    a dwell time of at least ``threshold`` seconds). Without enough training
    rows with a value (``min_rows``) the reranker trains the click task alone
    and says so in its report.
    """

    target: str = "rating"
    kind: Literal["regression", "binary"] = "regression"
    threshold: float | None = None
    # Multiplier of its loss beside the click's (which is 1).
    weight: float = Field(default=0.5, ge=0.0)
    min_rows: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _check(self) -> SecondTaskConfig:
        if (self.kind == "binary") != (self.threshold is not None):
            raise ValueError("second_task.threshold is needed by kind 'binary' and only by it")
        return self


class RankerConfig(Section):
    """The reranker (models.moe), its training loop, Ray Train, tuning and fine-tuning.

    Defaults were chosen on MovieLens-100K's validation AUC (label rating >= 4).
    """

    # moe: the model; dense / logistic: the ablation baselines in the same code path.
    kind: Literal["moe", "dense", "logistic"] = "moe"
    embedding_dim: int = Field(default=16, ge=1)
    n_experts: int = Field(default=8, ge=1)
    top_k: int = Field(default=2, ge=1)
    expert_hidden: tuple[int, ...] = (128,)
    expert_dim: int = Field(default=64, ge=1)
    gate_noise: float = Field(default=0.1, ge=0.0)
    capacity_factor: float = Field(default=1.25, gt=0.0)
    aux_loss_weight: float = Field(default=0.01, ge=0.0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    field_interactions: bool = False
    batch_size: int = Field(default=1024, ge=2)
    # Upper bound; early stopping on validation AUC usually ends sooner.
    epochs: int = Field(default=20, ge=1)
    patience: int = Field(default=2, ge=1)
    learning_rate: float = Field(default=0.003, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    seed: int = 0
    # Examples split by time (the last valid/test shares of the log): the
    # honest protocol for a click log; random for tables without time.
    split: Literal["temporal", "random"] = "temporal"
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    # Rows the split-and-encode pass reads, encodes and writes at a time (one
    # encoded file each): bounds the driver's memory at any log size.
    chunk_rows: int = Field(default=200_000, ge=1_000)
    # Rows a training worker mixes in its local shuffle buffer (the encoded files
    # arrive in a random order, each in time order): the bound on what a worker
    # holds besides the model; 64 default batches.
    shuffle_buffer_rows: int = Field(default=65_536, ge=0)
    # Encoded files each Ray Data dataset of the trainer reads at once (a file is a
    # chunk): what a read holds in memory, beside the object store's own bound.
    read_tasks: int = Field(default=2, ge=1)
    calibration: Literal["temperature", "isotonic", "none"] = "temperature"
    # Ray Train, as in models.retrieval.
    workers: int = Field(default=1, ge=1)
    cpus_per_worker: float | None = Field(default=None, gt=0.0)
    use_gpu: bool = False
    max_failures: int = Field(default=2, ge=0)
    registered_model: str = "rayrec-ranker"
    gate_metric: str = "auc"
    # None: the click task alone.
    second_task: SecondTaskConfig | None = SecondTaskConfig()
    # The two-tower's score of each row as an input (serving has it from Faiss).
    # Honest only when retrieval splits by time like the reranker
    # (models.split.kind temporal, same ratios): the step refuses otherwise.
    retrieval_score: bool = False
    tuning: RankerTuningConfig = RankerTuningConfig()
    finetune: RankerFinetuneConfig = RankerFinetuneConfig()

    @model_validator(mode="after")
    def _check(self) -> RankerConfig:
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts})")
        if any(r < 0 for r in self.split_ratios) or abs(sum(self.split_ratios) - 1) > 1e-9:
            raise ValueError(f"split_ratios must be >= 0 and sum to 1, got {self.split_ratios}")
        return self


class ModelsConfig(Section):
    """Model hyper-parameters and the candidate index."""

    index: IndexConfig = IndexConfig()
    split: SplitConfig = SplitConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    ranker: RankerConfig = RankerConfig()


class ExplorationConfig(Section):
    """How a served list departs from the reranker's order, so logs cover more than its top.

    ``none``: the reranker's order, every shown item's propensity 1. ``epsilon``:
    each slot, with probability ``epsilon``, takes a uniformly random remaining
    candidate instead of the best remaining one. ``softmax``: each slot samples
    the remaining candidates by ``softmax(logit / temperature)`` (Plackett-Luce).
    Either way the response carries each shown item's propensity (the
    probability of that item at that slot given the slots above it), which the
    client logs with the impression for IPS/SNIPS evaluation.
    """

    kind: Literal["none", "epsilon", "softmax"] = "none"
    # 5%: enough off-policy coverage for IPS in a week of default traffic while
    # costing at most 5% of slots.
    epsilon: float = Field(default=0.05, ge=0.0, le=1.0)
    # On the reranker's logit scale: 1.0 samples by the model's own odds.
    temperature: float = Field(default=1.0, gt=0.0)
    # Exploration samples only among the best ``pool`` candidates: a random
    # item from the tail of 200 is rarely worth a slot.
    pool: int = Field(default=50, ge=1)
    # None: a fresh random stream per process; an int makes answers reproducible (tests).
    seed: int | None = None


class DiversityConfig(Section):
    """Maximal marginal relevance over the reranked list (``mmr_lambda`` None: off).

    Each slot takes the candidate maximising ``lambda * relevance - (1 - lambda) *
    max cosine(item, items already chosen)`` on the two-tower item vectors;
    relevance is the calibrated click probability min-max scaled to [0, 1].
    1.0 is the plain ranking; 0.7 is the usual starting point (Carbonell and
    Goldstein, 1998).
    """

    mmr_lambda: float | None = Field(default=None, ge=0.0, le=1.0)


class ServeAppConfig(Section):
    """The Ray Serve application (:mod:`serving.app`): address, replicas, limits."""

    host: str = "127.0.0.1"
    # Not 8000: Ray Serve and the Evidently UI both default to it.
    port: int = Field(default=8600, ge=1, le=65535)
    name: str = "rayrec"
    route_prefix: str = "/"
    # haproxy: Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY, set before a
    # local Ray starts; on a cluster set it in the cluster's environment); python:
    # Serve's own proxy actor. Measured (benchmarks/serving.py, 2 cores, 100k
    # items): the Python proxy spends ~5.8 ms of CPU per request and the app
    # collapsed at 100 req/s; HAProxy ~0.2 ms, and 100 req/s held with p99 15 ms.
    proxy: Literal["haproxy", "python"] = "haproxy"
    # 2: a request path is one Python thread at a time (the GIL), ~8 ms of CPU per
    # request in a replica, so one replica tops out near 100 req/s; two use both
    # cores of a laptop.
    num_replicas: int = Field(default=2, ge=1)
    # CPUs reserved per replica: 1 leaves the second core to the proxy and the
    # event writes on a 2-core machine.
    num_cpus: float = Field(default=1.0, gt=0.0)
    # Requests in flight per replica: a request is CPU-bound (one torch thread),
    # so a few in flight hide the HTTP and store waits; more only queue inside.
    max_ongoing_requests: int = Field(default=8, ge=1)
    # Requests waiting for a replica: past it, a fast 503 instead of a queue
    # that turns every answer late (Serve's default, -1, is unbounded).
    max_queued_requests: int = Field(default=64, ge=1)
    # Bodies above this are refused with 413 before parsing (Serve and FastAPI
    # take 20 MB by default); 64 KB holds a 500-event batch.
    max_body_bytes: int = Field(default=65_536, ge=1_024)
    # Serve's proxy drops a request after this (Serve's default: none).
    request_timeout_s: float = Field(default=5.0, gt=0.0)
    # Events per POST /v1/events.
    max_events_per_batch: int = Field(default=500, ge=1)
    # Seconds between checks of the MLflow @champion (None: only `rayrec serve reload`).
    poll_champion_s: float | None = Field(default=None, gt=0.0)
    # `rayrec run` ends by (re)deploying the champion when True.
    deploy_after_run: bool = False


class ServingConfig(Section):
    """The online request path (:mod:`serving.recommender`): sizes, bounds, time budget."""

    # Candidates taken from the index per request (N) and reranked: the rerank cost
    # grows linearly with N, and 200 is where the two-tower's candidate recall
    # flattens on the default world while a CPU MoE pass over them stays in
    # single-digit milliseconds.
    candidates: int = Field(default=200, ge=1)
    # The largest k a request may ask for: a page of results. Must not exceed
    # ``candidates`` (the reranker can only order what retrieval returned).
    max_k: int = Field(default=100, ge=1)
    # Whole-request budget. Checked before the rerank: a request already past it
    # is answered in retrieval order (flagged ``reranked: false``) rather than
    # made later; 50 ms is issue 6's p99 bar.
    deadline_ms: float = Field(default=50.0, gt=0.0)
    # Drop the user's recent positives (the online store's history) from answers:
    # re-recommending what was just clicked wastes a slot.
    exclude_seen: bool = True
    # Window of the popularity fallback, one of features.windows_days; None: the
    # longest (the steadiest ranking; the store keeps the Count-Min days of
    # exactly that window).
    popularity_window_days: int | None = Field(default=None, ge=1)
    # Torch threads of a serving process. One request scores ~N rows: thread
    # fan-out costs more than it saves, and replicas share the cores (measured on
    # tiny, 2 busy cores: median request 26 ms at 1 thread, 130 ms at 2).
    torch_threads: int = Field(default=1, ge=1)
    # Where the served models come from: the MLflow registry's @champion of both
    # models (what the pipeline promoted), or the workdir's published step outputs
    # (no tracking needed; tests and --no-track runs).
    models_from: Literal["champion", "published"] = "champion"
    # Where POST /v1/events appends (Parquet, one folder per UTC date); None:
    # <workdir>/event_log. Training and monitoring read it.
    event_log: str | None = None
    # Where every answer's rows go for monitoring (Parquet by UTC date, as the
    # event log); None: <workdir>/prediction_log. Written from a buffer in the
    # background every prediction_log_flush_s or prediction_log_flush_rows rows
    # (a replica that dies loses at most that much; monitoring samples anyway).
    prediction_log: str | None = None
    record_predictions: bool = True
    prediction_log_flush_s: float = Field(default=10.0, gt=0.0)
    prediction_log_flush_rows: int = Field(default=10_000, ge=1)
    exploration: ExplorationConfig = ExplorationConfig()
    diversity: DiversityConfig = DiversityConfig()
    app: ServeAppConfig = ServeAppConfig()

    @model_validator(mode="after")
    def _check(self) -> ServingConfig:
        if self.max_k > self.candidates:
            raise ValueError(
                f"max_k ({self.max_k}) must be <= candidates ({self.candidates}): "
                "the reranker only orders what retrieval returned"
            )
        return self


# --------------------------------------------------------------------------- monitoring


class SmtpConfig(Section):
    """Where alert e-mails go. Secrets come from the environment, e.g.
    ``RAYREC_MONITORING__ALERTS__SMTP__PASSWORD``; the password is a ``SecretStr``,
    masked wherever the config is printed or logged."""

    host: str = "127.0.0.1"
    port: int = Field(default=25, ge=1, le=65535)
    # none: plain SMTP (a local relay); starttls: upgrade on the plain port (587);
    # ssl: TLS from the first byte (465).
    security: Literal["none", "starttls", "ssl"] = "none"
    user: str | None = None
    password: SecretStr | None = None
    sender: str = "rayrec-monitoring@localhost"
    recipients: tuple[str, ...] = ()
    timeout_s: float = Field(default=10.0, gt=0.0)


class AlertConfig(Section):
    """Drift alert e-mails: sent once per (monitor, window, finding), retried, never lost."""

    enabled: bool = True
    smtp: SmtpConfig = SmtpConfig()
    # The same finding of the same monitor is not mailed again within this time,
    # even for a new window: one e-mail per drift, not one per day of it.
    cooldown_hours: float = Field(default=24.0, ge=0.0)
    # last_seen: every window that still shows the finding extends its cooldown, so
    # a drift that persists is mailed once, and again only after it was gone for
    # cooldown_hours; last_sent: a reminder every cooldown_hours while it persists.
    cooldown_from: Literal["last_seen", "last_sent"] = "last_seen"
    # monitor: a finding of the monitor in cooldown holds back its other findings
    # too (one incident shows in several checks over its first days: one e-mail);
    # finding: each finding key keeps its own cooldown.
    cooldown_scope: Literal["monitor", "finding"] = "monitor"
    # Attempts per e-mail, with exponential backoff from backoff_s.
    attempts: int = Field(default=3, ge=1)
    backoff_s: float = Field(default=1.0, ge=0.0)
    # When every attempt fails the alert goes to the dead-letter file and the
    # monitoring run fails (``fail``: a scheduler sees it) or only warns.
    on_smtp_failure: Literal["fail", "warn"] = "fail"
    # None: <workdir>/monitoring/dead_letter.jsonl
    dead_letter: str | None = None
    # Base URL the e-mail links reports under (None: the report's local path).
    report_base_url: str | None = None
    # The full Evidently HTML can be several MB: attach it only below this size.
    max_attachment_kb: int = Field(default=512, ge=0)


class DriftTestConfig(Section):
    """Evidently's statistical test per column type and window size, and its threshold.

    Small windows use tests with p-values (KS for numbers, chi-squared for
    categories: significant at ``p < threshold``); large ones use distances
    (Wasserstein normalised by the reference's std, Jensen-Shannon), since any
    difference is significant with enough rows.
    """

    # 2,000: the normalised Wasserstein distance of two clean samples of 1,000 rows
    # reaches 0.09 at its p99, too near the 0.1 threshold.
    large_window_rows: int = Field(default=2_000, ge=1)
    numeric_small: str = "ks"
    numeric_large: str = "wasserstein"
    categorical_small: str = "chisquare"
    categorical_large: str = "jensenshannon"
    p_value_threshold: float = Field(default=0.05, gt=0.0, lt=1.0)
    distance_threshold: float = Field(default=0.1, gt=0.0)
    # Per-column overrides of the threshold, by feature name (in the unit of the
    # test the column gets: a p-value or a distance).
    thresholds: dict[str, float] = Field(default_factory=dict)
    # A categorical column keeps its reference's most frequent values, the rest is
    # "__other__": thousands of hash buckets otherwise drift from noise alone.
    max_categories: int = Field(default=20, ge=2)
    # bonferroni: p-value tests at threshold / columns. Uncorrected, 20 clean
    # columns at p < 0.05 flag one or more in ~64% of small windows; corrected ~5%.
    p_value_correction: Literal["none", "bonferroni"] = "bonferroni"
    # A distance test's threshold is at least noise_margin times the largest
    # distance between one day before the reference's end and the others (the
    # log's own day-to-day noise, measured when the profile is saved; 3+ days).
    # Healthy days of clustered traffic differ by 0.05-0.14 on some columns, and
    # the largest of 10-14 days still underestimates a later day's (1.5 let a
    # clean simulator day through on one column at 1.07x the threshold).
    noise_margin: float = Field(default=2.0, gt=0.0)
    # Rows per side of each leave-one-day-out comparison (bounds the cost).
    noise_rows: int = Field(default=10_000, ge=100)


class SketchCheckConfig(Section):
    """The cheap per-window checks on sketches (:mod:`monitoring.sketch_checks`)."""

    enabled: bool = True
    # DAU (HLL) of the window against the median of this many days before it.
    trend_days: int = Field(default=14, ge=2)
    # Heavy hitters (Count-Min) compared between the window and the reference.
    head_k: int = Field(default=20, ge=1)
    # Drift when the statistic exceeds margin x the largest leave-one-day-out
    # statistic of the baseline days, and at least the floor.
    margin: float = Field(default=1.5, gt=0.0)
    dau_floor: float = Field(default=0.1, ge=0.0)
    head_floor: float = Field(default=0.05, ge=0.0)
    min_days: int = Field(default=3, ge=2)


class EmbeddingCheckConfig(Section):
    """Embedding drift and ANN health (:mod:`monitoring.embeddings`), on the two-tower's vectors."""

    enabled: bool = True
    # Vectors a side the domain classifier sees: the reference keeps this many
    # (user and item vector of each sampled row), a window is sampled to it.
    rows: int = Field(default=5_000, ge=100)
    # Drift when the classifier's AUC - 0.5 exceeds margin x the largest
    # leave-one-day-out statistic of the reference days, and at least the floor
    # (0.05: AUC 0.55, Evidently's default for its "model" method).
    margin: float = Field(default=2.0, gt=0.0)
    floor: float = Field(default=0.05, ge=0.0)
    min_rows: int = Field(default=200, ge=10)
    # ANN health: this many of the window's users (their vectors) query the live
    # index and exact search over its own vectors, top serving.candidates each;
    # unhealthy below min_recall (benchmarks/ann.py: HNSW at the defaults 0.98 at 1M items).
    ann_queries: int = Field(default=500, ge=1)
    ann_min_recall: float = Field(default=0.9, ge=0.0, le=1.0)


class MonitoringConfig(Section):
    """Reference profiles, drift windows, checks and alerts (:mod:`monitoring`)."""

    # Length of one current window.
    window_days: int = Field(default=1, ge=1)
    # Rows of features and predictions kept in the reference profile saved
    # beside a model (a seeded sample; sketches cover the whole data).
    reference_rows: int = Field(default=50_000, ge=100)
    # The reference is drawn from the last reference_days (whole UTC days) of the
    # reranker's held-out part (valid + test: a model's scores on its own training
    # rows are sharper than on any later day): the past nearest the windows, past
    # the first days where windowed counts are still filling up. None: all of it.
    reference_days: int | None = Field(default=14, ge=1)
    # Rows of a current window Evidently sees: a seeded uniform sample above it
    # (Evidently costs ~3.6 s per column per million rows here).
    max_window_rows: int = Field(default=100_000, ge=100)
    drift: DriftTestConfig = DriftTestConfig()
    # Share of features drifted that makes the data-drift finding.
    drifted_share_alert: float = Field(default=0.0, ge=0.0, le=1.0)
    # Concept drift: AUC and logloss drift when the bootstrap CI of their change
    # (window minus reference, both resampled) excludes 0; ECE when the window's
    # rises above the range of the reference's at the window's size. 0.99: at
    # 0.95 about 10% of clean 2k-row windows flagged one of the three metrics.
    concept_min_labels: int = Field(default=500, ge=10)
    concept_ci: float = Field(default=0.99, gt=0.5, lt=1.0)
    # ... and when the metric moved by at least this much (absolute): rows of one
    # session are not independent, so clean days leave the row bootstrap's
    # interval more often than it says (ECE did on 2 of 10 clean simulator days,
    # by < 0.008); smaller moves are nothing to act on.
    concept_min_change: dict[Literal["auc", "logloss", "ece"], float] = Field(
        default_factory=lambda: {"auc": 0.01, "logloss": 0.01, "ece": 0.01}
    )
    sketches: SketchCheckConfig = SketchCheckConfig()
    embeddings: EmbeddingCheckConfig = EmbeddingCheckConfig()
    alerts: AlertConfig = AlertConfig()
    # `rayrec monitor ui` (the Evidently workspace): not 8000 (Serve's default).
    ui_port: int = Field(default=8700, ge=1, le=65535)


class PipelineConfig(Section):
    name: str = "main"
    # Published versions kept per step output (older ones are deleted).
    keep_versions: int = Field(default=2, ge=1)
    # Seconds to wait for another run's lock on the same workdir (0: fail at once).
    lock_timeout_s: float = Field(default=0.0, ge=0.0)


class ScheduledJob(Section):
    """One scheduled pipeline run: a ``rayrec`` command line on a cron schedule."""

    # The arguments after `rayrec` (the preset and --set overrides of the
    # scheduler's own config are added), e.g. ["run", "--until", "materialize"].
    command: list[str] = Field(min_length=1)
    # Five-field crontab (minute hour day-of-month month day-of-week) in schedule.timezone,
    # read as cron and Kubernetes CronJobs read it (day-of-week 0 and 7 are Sunday).
    cron: str
    enabled: bool = True

    @model_validator(mode="after")
    def _check_cron(self) -> ScheduledJob:
        fields = self.cron.split()
        if len(fields) != 5:
            raise ValueError(
                f"cron {self.cron!r} must have 5 fields (minute hour day-of-month month "
                "day-of-week)"
            )
        # Cron runs a slot when *either* restricted day field matches, APScheduler when
        # both do: the two would disagree, so only one of them may be restricted.
        if fields[2] not in ("*", "?") and fields[4] not in ("*", "?"):
            raise ValueError(
                f"cron {self.cron!r} restricts both day-of-month and day-of-week; "
                "restrict one (cron ORs them, APScheduler ANDs them)"
            )
        return self


def _default_jobs() -> dict[str, ScheduledJob]:
    return {
        # Nightly: new events through validation into features and the online store.
        "features": ScheduledJob(command=["run", "--until", "materialize"], cron="0 2 * * *"),
        # Weekly: the whole main job (retrain, evaluate with gates, register, monitor).
        "retrain": ScheduledJob(command=["run"], cron="0 3 * * 0"),
        # Other nights: LoRA fine-tune of the reranker on the newest days.
        "finetune": ScheduledJob(command=["finetune", "ranker"], cron="0 4 * * 1-6"),
        # Hourly: drift of the newest window against the reference.
        "monitor": ScheduledJob(command=["monitor", "run"], cron="15 * * * *"),
    }


class ScheduleConfig(Section):
    """`rayrec schedule` (APScheduler, in process) and the cluster's CronJobs (infra/deploy)."""

    timezone: str = "UTC"
    jobs: dict[str, ScheduledJob] = Field(default_factory=_default_jobs)
    # Ray Jobs API the runs are submitted to (the dashboard, e.g. http://head:8265);
    # None: RAY_ADDRESS, else a local Ray the scheduler starts.
    jobs_address: str | None = None
    # A slot missed while the scheduler was down runs once when it is back, if it
    # is at most this old; the slots before it are not run (one catch-up).
    misfire_grace_s: int = Field(default=6 * 3600, ge=1)
    # The program a Ray Job runs. None: the `rayrec` beside the scheduler's Python
    # when the Jobs API is on this machine (a virtualenv need not be on PATH), else
    # `rayrec` from the cluster image's PATH.
    entrypoint: str | None = None
    # How long a submission the Jobs API refuses as not ready (no job agent yet, a
    # dropped connection) is retried before the slot counts as failed.
    submit_timeout_s: float = Field(default=60.0, gt=0.0)
    # How often the running scheduler refreshes the Ray Job status of its unfinished
    # submissions in the history (what `rayrec runs` shows).
    status_poll_s: float = Field(default=60.0, gt=0.0)

    @model_validator(mode="after")
    def _check_schedule(self) -> ScheduleConfig:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown timezone {self.timezone!r} (an IANA name, e.g. UTC)"
            ) from None
        allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-")
        for name in self.jobs:
            # A job name starts its Ray submission ids and names its Kubernetes CronJob:
            # lowercase letters, digits and inner dashes (a DNS label) fit both.
            if not name or not set(name) <= allowed or name[0] == "-" or name[-1] == "-":
                raise ValueError(
                    f"schedule job name {name!r}: use lowercase letters, digits and inner dashes"
                )
        return self


class RayrecConfig(Section):
    """The fully resolved configuration of one run."""

    preset: str = "default"
    paths: PathsConfig = PathsConfig()
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
    logging: LoggingConfig = LoggingConfig()
    data: DataConfig = DataConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    features: FeaturesConfig = FeaturesConfig()
    models: ModelsConfig = ModelsConfig()
    serving: ServingConfig = ServingConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    pipeline: PipelineConfig = PipelineConfig()
    schedule: ScheduleConfig = ScheduleConfig()

    @model_validator(mode="after")
    def _check_popularity_window(self) -> RayrecConfig:
        window = self.serving.popularity_window_days
        if window is not None and window not in self.features.windows_days:
            raise ValueError(
                f"serving.popularity_window_days ({window}) must be one of "
                f"features.windows_days {list(self.features.windows_days)}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def section_hash(self, *dotted: str) -> str:
        """sha256 of the named sections (all of it when none), for fingerprints."""
        data = self.to_dict()
        picked = {key: _get_dotted(data, key) for key in dotted} if dotted else data
        blob = json.dumps(picked, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------- loading


def load_config(
    preset: str = "default",
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> RayrecConfig:
    """Resolve a preset (a packaged name or a YAML path), then env, then ``--set``.

    >>> load_config("tiny", ["simulator.n_users=50"]).simulator.n_users
    50
    """
    layers: list[tuple[str, dict[str, Any]]] = [(f"preset {preset}", _read_preset(preset))]
    env = os.environ if environ is None else environ
    env_tree = _env_overrides(env)
    if env_tree:
        layers.append(("environment", env_tree))
    set_tree: dict[str, Any] = {}
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(set_tree, key, value)
    if set_tree:
        layers.append(("--set", set_tree))

    merged: dict[str, Any] = {"preset": Path(preset).stem}
    for _, tree in layers:
        merged = _deep_merge(merged, tree)
    try:
        return RayrecConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, layers)) from None


def _read_preset(preset: str) -> dict[str, Any]:
    path = Path(preset)
    if preset in PRESETS:
        text = resources.files("infra").joinpath("presets", f"{preset}.yaml").read_text()
    elif path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text()
    else:
        raise ConfigError(
            f"unknown preset {preset!r}: use one of {', '.join(PRESETS)} or a path to a YAML file"
        )
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {preset!r} must hold a mapping at the top level")
    return data


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or ENV_NESTED_DELIMITER not in name:
            # Single-level RAYREC_* names (RAYREC_DEBUG, ...) are runtime switches, not config.
            continue
        dotted = ".".join(
            part.lower() for part in name[len(ENV_PREFIX) :].split(ENV_NESTED_DELIMITER)
        )
        _set_dotted(tree, dotted, yaml.safe_load(raw) if raw else raw)
    return tree


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        parsed = yaml.safe_load(value) if value else value
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {value!r}: {exc}") from None
    return key.strip(), parsed


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _get_dotted(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"unknown config key {dotted!r}")
        node = node[part]
    return node


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _explain(exc: ValidationError, layers: list[tuple[str, dict[str, Any]]]) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        if err["type"] == "extra_forbidden":
            origin = next(
                (name for name, tree in reversed(layers) if _has_dotted(tree, loc)), "config"
            )
            problems.append(f"unknown config key {loc!r} (from {origin})")
        else:
            problems.append(f"{loc or 'config'}: {err['msg']}")
    return "; ".join(problems)


def _has_dotted(tree: Mapping[str, Any], dotted: str) -> bool:
    try:
        _get_dotted(tree, dotted)
    except ConfigError:
        return False
    return True
