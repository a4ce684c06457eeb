"""The online feature store: latest user/item vectors and histories, for serving.

One interface (:class:`OnlineStore`), two real backends chosen by
``features.online_store.kind``: ``sqlite`` (default: one WAL file, no server)
and ``redis`` (production). Both keep, per entity, its compacted day buckets,
its feature vector as of its last write and (users) its recent positive items,
and update them with the batch path's own functions (see :mod:`.state`). They
also keep the sketches (:mod:`.sketch_state`): an HLL per user (distinct
items) and per item (distinct users), and a Count-Min of item frequency per
UTC day (store-wide, the longest window's days, ~1.1 MB a day at the default
epsilon); vectors carry ``distinct_items`` / ``distinct_users`` and
``popularity_cms_{w}d``::

    store = make_online_store(config.features, workdir)
    store.materialize(user_buckets, item_buckets, history, prior, as_of, sketches)  # batch
    store.apply_events(events)                                                     # stream
    store.refresh(as_of)                                                # daily roll-over
    store.read_user(user_id).values; store.read_items(ids); store.read_history(user_id)

Reads are key lookups that return values as of the entity's last write or
refresh; they never raise (defaults, ``found=False``, ``degraded=True`` on a
backend failure). Writes raise :class:`OnlineStoreError`.
"""

from __future__ import annotations

from pathlib import Path

from features.online_store.redis import RedisOnlineStore
from features.online_store.sqlite import SqliteOnlineStore
from features.online_store.store import FeatureRead, OnlineStore, OnlineStoreError
from infra.config import FeaturesConfig
from infra.errors import ConfigError

# kind -> backend class (an explicit mapping: a new backend is one line here).
BACKENDS: dict[str, type[OnlineStore]] = {
    "sqlite": SqliteOnlineStore,
    "redis": RedisOnlineStore,
}


def make_online_store(config: FeaturesConfig, workdir: str | Path) -> OnlineStore:
    """The backend ``config.online_store.kind`` names, opened (tables/keys ready).

    sqlite: ``online_store.url`` as a file path, else ``<workdir>/online/features.sqlite``
    (``workdir`` must be local: SQLite needs a file system with locks).
    redis: ``online_store.url`` (``redis://host:port/db``), else 127.0.0.1:6379/0,
    keys under ``online_store.key_prefix``.
    """
    kind = config.online_store.kind
    if kind not in BACKENDS:
        raise ConfigError(f"online_store.kind {kind!r}: use one of {', '.join(BACKENDS)}")
    return BACKENDS[kind].from_config(config, workdir)


__all__ = [
    "BACKENDS",
    "FeatureRead",
    "OnlineStore",
    "OnlineStoreError",
    "RedisOnlineStore",
    "SqliteOnlineStore",
    "make_online_store",
]
