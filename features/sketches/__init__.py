"""Apache DataSketches as mergeable, first-class features.

* HLL distinct counts per entity (:mod:`.hll`): diversity (distinct items per
  user), reach (distinct users per item), DAU (distinct users per UTC day).
  Each is a ``pl.Binary`` column of compact serialised sketches next to an f64
  estimate column; frames merge by entity (per-block builds reduce, live events
  fold in) and the online :func:`update_hll` shares the batch's update routine.
* Count-Min item frequencies (:mod:`.cms`): global, per UTC day, any window as
  the merge of its days; vectorised look-ups and heavy hitters over candidates.

Shapes come from ``features.sketches`` in the config (:mod:`.base`):
``HllConfig`` (lg_k, type; relative standard error 1.04 / sqrt(2 ** lg_k),
bytes per entity bounded by :attr:`HllConfig.max_bytes`) and ``CmsConfig``
(width ceil(e / epsilon), depth ceil(ln(1 / delta)); overestimate <= epsilon * N).
"""

from features.sketches.base import (
    CmsConfig,
    HllConfig,
    SketchMemory,
    cms_error_bound,
    hll_relative_standard_error,
    sketch_memory,
)
from features.sketches.cms import (
    TopItems,
    cms_by_day,
    cms_estimates,
    cms_from_events,
    cms_total_weight,
    cms_window,
    merge_cms,
    merge_cms_many,
    top_items,
)
from features.sketches.hll import (
    daily_active_users,
    distinct_per_entity,
    hll_estimate,
    item_reach,
    merge_hll,
    merge_hll_columns,
    update_hll,
    user_diversity,
)
from features.sketches.tables import SketchTables, build_sketch_tables, merge_sketch_tables

__all__ = [
    "CmsConfig",
    "HllConfig",
    "SketchMemory",
    "SketchTables",
    "TopItems",
    "build_sketch_tables",
    "cms_by_day",
    "cms_error_bound",
    "cms_estimates",
    "cms_from_events",
    "cms_total_weight",
    "cms_window",
    "daily_active_users",
    "distinct_per_entity",
    "hll_estimate",
    "hll_relative_standard_error",
    "item_reach",
    "merge_cms",
    "merge_cms_many",
    "merge_hll",
    "merge_hll_columns",
    "merge_sketch_tables",
    "sketch_memory",
    "top_items",
    "update_hll",
    "user_diversity",
]
