"""validate: type the raw tables, quarantine bad rows, fail above the bound.

Entity tables are validated first so events can be checked against the ids
that exist. Events (and a CTR table) are validated one file at a time, so
memory stays bounded by the largest file the source wrote (the simulator's
``chunk_rows``), not the log. Bad rows of every table go to
``<workdir>/quarantine/<fingerprint>/<table>.parquet`` with their reasons,
whether the step passes or fails; the step publishes nothing when any table's
bad share exceeds ``data.validation.max_bad_fraction``.
"""

from __future__ import annotations

import datetime as dt
import io
import json

from features.dataset import (
    DATASET_FILE,
    dataset_kind,
    read_table,
    write_events_by_date,
    write_table,
)
from features.feature_spec import FeatureSpec
from features.schemas import EVENTS, ITEMS, USERS, contract_for_spec
from features.validation import ValidationResult, ValidationRules, combine, validate_table
from infra.config import RayrecConfig
from infra.errors import DataValidationError
from infra.storage import StoragePath
from pipelines.step import Step, StepContext, StepResult


def run_validate(ctx: StepContext) -> StepResult:
    raw = ctx.input_path("ingest")
    meta = dataset_kind(raw)
    quarantine = ctx.workdir.join("quarantine", ctx.fingerprint[:16])
    results = (
        _validate_interactions(raw, ctx.output, _rules(ctx.config, meta.get("ts_unit", "s")))
        if meta["kind"] == "interactions"
        else _validate_ctr(raw, ctx.output)
    )
    for result in results:
        if result.quarantined.height:
            # Outside any staging folder, so written atomically in place.
            buffer = io.BytesIO()
            result.quarantined.write_parquet(buffer, compression="zstd")
            quarantine.join(f"{result.table}.parquet").write_bytes_atomic(buffer.getvalue())
    bound = ctx.config.data.validation.max_bad_fraction
    for result in results:
        try:
            result.raise_if_over_bound(bound)
        except DataValidationError as exc:
            raise DataValidationError(
                f"{exc} ({quarantine.join(result.table + '.parquet').uri})"
            ) from None
    ctx.output.join(DATASET_FILE).write_text_atomic(json.dumps({**meta, "ts_unit": "us"}))
    return StepResult(
        row_counts={r.table: r.n_valid for r in results}
        | {f"{r.table}_quarantined": r.quarantined.height for r in results},
        metrics={f"bad_fraction_{r.table}": r.bad_fraction for r in results},
        extra={
            "quarantine": quarantine.uri if any(r.quarantined.height for r in results) else None,
            "reasons": {r.table: r.reason_counts for r in results},
        },
    )


def _rules(config: RayrecConfig, ts_unit: str) -> ValidationRules:
    bounds = config.data.validation
    latest = dt.datetime.now(dt.UTC) + dt.timedelta(hours=bounds.max_future_skew_hours)
    return ValidationRules(ts_min=bounds.ts_min, ts_max=latest, ts_unit=ts_unit)  # type: ignore[arg-type]


def _validate_interactions(
    raw: StoragePath, out: StoragePath, rules: ValidationRules
) -> list[ValidationResult]:
    users = validate_table(read_table(raw.join("users.parquet")), USERS, rules)
    items = validate_table(read_table(raw.join("items.parquet")), ITEMS, rules)
    write_table(users.valid, out.join("users.parquet"))
    write_table(items.valid, out.join("items.parquet"))
    if raw.join("id_map.parquet").exists():
        write_table(read_table(raw.join("id_map.parquet")), out.join("id_map.parquet"))
    known = {
        "user_id": users.valid.get_column("user_id"),
        "item_id": items.valid.get_column("item_id"),
    }
    files = [f for f in raw.join("events").files() if f.path.endswith(".parquet")]
    if not files:
        raise DataValidationError(f"events: no Parquet files below {raw.join('events').uri}")
    parts = []
    for index, file in enumerate(files):
        part = validate_table(read_table(file), EVENTS, rules, known_ids=known)
        write_events_by_date(part.valid, out.join("events"), part=index)
        parts.append(_without_good_rows(part))
    return [users, items, combine(parts)]


def _validate_ctr(raw: StoragePath, out: StoragePath) -> list[ValidationResult]:
    """The CTR table one file at a time, as the events: memory follows the largest file."""
    spec = FeatureSpec.load(raw)
    contract = contract_for_spec(spec)
    files = [f for f in raw.join("table").files() if f.path.endswith(".parquet")]
    if not files:
        raise DataValidationError(f"table: no Parquet files below {raw.join('table').uri}")
    out.join("table").makedirs()
    parts = []
    for index, file in enumerate(files):
        part = validate_table(read_table(file), contract)
        write_table(part.valid, out.join("table", f"part-{index:05d}.parquet"))
        parts.append(_without_good_rows(part))
    spec.save(out)
    return [combine(parts)]


def _without_good_rows(part: ValidationResult) -> ValidationResult:
    """``part`` once its good rows are on disk: what the report needs (counts, bad rows)."""
    return ValidationResult(
        part.table, part.valid.head(0), part.quarantined, part.reason_counts, part.n_valid
    )


VALIDATE = Step(
    name="validate",
    run=run_validate,
    description="type raw tables, quarantine bad rows with reasons, fail above the bound",
    inputs=("ingest",),
    config_keys=("data.validation",),
    code=("features.validation", "features.schemas", "pipelines.steps.validate"),
)
