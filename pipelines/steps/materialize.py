"""materialize: load the latest feature values into the online store.

Reads the ``features`` step's buckets, histories, prior and sketch tables
(``sketches/``: per-entity HLLs and the Count-Min per day) and bulk-loads
them (:meth:`OnlineStore.materialize`: one transaction on SQLite, whole-entity
MULTI chunks on Redis). The step's own output is a small manifest saying what
was loaded where; the store itself is the product.
"""

from __future__ import annotations

import datetime as dt
import json

from features.aggregates import CtrPrior
from features.dataset import dataset_kind, read_table
from features.online_store import make_online_store
from features.sketches import SketchTables
from pipelines.step import Step, StepContext, StepResult


def run_materialize(ctx: StepContext) -> StepResult:
    features = ctx.input_path("features")
    if dataset_kind(ctx.input_path("validate"))["kind"] == "ctr":
        # A generic CTR table has no users or items to serve features for.
        ctx.output.join("online.json").write_text_atomic(json.dumps({"skipped": "ctr dataset"}))
        return StepResult(row_counts={"users": 0, "items": 0}, extra={"skipped": True})
    prior_record = json.loads(features.join("prior.json").read_text())
    prior = CtrPrior(rate=prior_record["rate"], strength=prior_record["strength"])
    as_of = dt.datetime.fromisoformat(prior_record["as_of"])
    sketches = SketchTables(
        **{n: read_table(features.join("sketches", f"{n}.parquet")) for n in SketchTables.NAMES}
    )
    store = make_online_store(ctx.config.features, ctx.workdir.local_path())
    try:
        counts = store.materialize(
            read_table(features.join("buckets", "user.parquet")),
            read_table(features.join("buckets", "item.parquet")),
            read_table(features.join("latest", "history.parquet")),
            prior,
            as_of,
            sketches=sketches,
        )
    finally:
        store.close()
    online = ctx.config.features.online_store
    record = {"kind": online.kind, "url": online.url, "as_of": as_of.isoformat(), **counts}
    ctx.output.join("online.json").write_text_atomic(json.dumps(record, indent=2))
    return StepResult(
        row_counts=counts, artifacts=("online.json",), extra={"online_store": online.kind}
    )


MATERIALIZE = Step(
    name="materialize",
    run=run_materialize,
    description="bulk-load the latest feature vectors, buckets and histories into the online store",
    inputs=("validate", "features"),
    config_keys=("features.online_store", "features.windows_days", "features.sketches"),
    code=("features.online_store", "pipelines.steps.materialize"),
)
