"""The production online store: Redis, one hash per entity.

Keys (``P`` = ``key_prefix``): ``P:u:<user_id>`` and ``P:i:<item_id>``,
hashes with fields ``v`` (vector), ``s`` (buckets) and, for users, ``h``
(history); ``P:cms:<day>`` strings, the Count-Min of item frequency of a UTC
day (days since 1970-01-01, ~1.1 MB each at the default epsilon, the longest
window's days only; :mod:`.sketch_state`); ``P:meta`` a string (prior,
clock, stored days, layout). Blobs as in :mod:`.state`. A single Redis (or a primary with replicas); on Redis Cluster
the multi-key transactions would need the keys in one hash slot.

Reads are one round trip each: a cached Lua script (``EVALSHA``) that does
``GET meta`` + ``HMGET`` of the user (``read_user``) or one ``HGET`` per item
(``read_items``); a missing key reads as nil, so order is kept. The read client's socket and
connect timeouts are ``timeout_s`` with one immediate retry, so a dropped
connection reconnects on the next read (redis-py) and a dead server costs a
read at most ~``2 * timeout_s`` before it returns defaults marked degraded.

Writes: ``apply_events``/``refresh`` run optimistically: ``WATCH`` the touched
keys, the day sketches of the batch's days and the meta, read them with one
``EVAL``, compute, then ``MULTI``/
``EXEC`` the new records; a concurrent write to any of those keys makes
``EXEC`` fail and the update is recomputed (up to :data:`MAX_ATTEMPTS`).
``materialize`` writes ``MULTI``/``EXEC`` chunks (each entity whole), then the
day sketches, the meta last.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import redis as redis_client
from redis.backoff import NoBackoff
from redis.retry import Retry

from features.online_store.state import chunks
from features.online_store.store import (
    CHUNK_ENTITIES,
    OnlineStore,
    OnlineStoreError,
    Snapshot,
    Update,
    Writes,
)
from infra.config import FeaturesConfig

DEFAULT_URL = "redis://127.0.0.1:6379/0"
# Writes move more data (a materialize chunk) than a read: they get longer to answer.
WRITE_TIMEOUT_S = 10.0
# Optimistic update retries before apply_events gives up under write contention.
MAX_ATTEMPTS = 20
_TAGS = {"user": "u", "item": "i"}
# KEYS[1] the meta, KEYS[2] the user: (meta, [v, h]).
_READ_USER = """
return {redis.call('GET', KEYS[1]), redis.call('HMGET', KEYS[2], 'v', 'h')}
"""
# KEYS[1] the meta, KEYS[2..] entity hashes: (meta, v, v, ...).
_READ_VECTORS = """
local out = {redis.call('GET', KEYS[1])}
for i = 2, #KEYS do out[i] = redis.call('HGET', KEYS[i], 'v') end
return out
"""
# KEYS[1] the meta, KEYS[2..ARGV[1]+1] entity hashes, then day-sketch strings: the meta,
# each entity's (s, h) and each day's sketch, one round trip.
_READ_STATES = """
local out = {redis.call('GET', KEYS[1])}
local n = tonumber(ARGV[1])
for i = 2, n + 1 do out[i] = redis.call('HMGET', KEYS[i], 's', 'h') end
for i = n + 2, #KEYS do out[i] = redis.call('GET', KEYS[i]) end
return out
"""


class RedisOnlineStore(OnlineStore):
    backend: ClassVar[str] = "redis"
    _backend_errors = (redis_client.RedisError, OSError)

    def __init__(self, config: FeaturesConfig, url: str | None = None) -> None:
        super().__init__(config)
        store = config.online_store
        self.url = url or store.url or DEFAULT_URL
        self.prefix = store.key_prefix
        self._meta_key = f"{self.prefix}:meta"
        self._cms_pattern = re.compile(rf"^{re.escape(self.prefix)}:cms:(-?\d+)$".encode())
        self._id_pattern = {
            entity: re.compile(rf"^{re.escape(self.prefix)}:{tag}:(\d+)$".encode())
            for entity, tag in _TAGS.items()
        }
        self._reads = redis_client.Redis.from_url(
            self.url,
            socket_timeout=store.timeout_s,
            socket_connect_timeout=store.timeout_s,
            retry=Retry(NoBackoff(), 1),
        )
        # Reads are server-side scripts (EVALSHA): one command instead of a pipeline of
        # 100 halves the client's cost of a 100-item read (measured, benchmarks/online_store.py).
        self._read_user_script = self._reads.register_script(_READ_USER)
        self._read_vectors_script = self._reads.register_script(_READ_VECTORS)
        self._writes = redis_client.Redis.from_url(
            self.url,
            socket_timeout=max(store.timeout_s, WRITE_TIMEOUT_S),
            socket_connect_timeout=max(store.timeout_s, WRITE_TIMEOUT_S),
        )

    @classmethod
    def from_config(cls, config: FeaturesConfig, workdir: str | Path) -> RedisOnlineStore:
        return cls(config)

    def _key(self, entity: str, entity_id: int) -> str:
        return f"{self.prefix}:{_TAGS[entity]}:{entity_id}"

    def _cms_key(self, day: int) -> str:
        return f"{self.prefix}:cms:{day}"

    # ------------------------------------------------------------------ reads

    def _fetch_user(self, user_id: int) -> tuple[bytes | None, bytes | None, bytes | None]:
        meta, (vector, history) = self._read_user_script(
            keys=[self._meta_key, self._key("user", user_id)]
        )
        return vector, history, meta

    def _fetch_vectors(
        self, entity: str, ids: Sequence[int]
    ) -> tuple[list[bytes | None], bytes | None]:
        meta, *vectors = self._read_vectors_script(
            keys=[self._meta_key, *[self._key(entity, i) for i in ids]]
        )
        return vectors, meta

    def _fetch_history(self, user_id: int) -> bytes | None:
        return self._reads.hget(self._key("user", user_id), "h")

    def _fetch_meta(self) -> bytes | None:
        return self._reads.get(self._meta_key)

    def _scan(self, pattern: str) -> list[bytes]:
        return list(self._writes.scan_iter(match=pattern, count=1_000))

    def _entity_ids(self, entity: str) -> list[int]:
        ids = []
        prefix = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix)
        for key in self._scan(f"{prefix}:{_TAGS[entity]}:*"):
            match = self._id_pattern[entity].match(key)
            if match:
                ids.append(int(match.group(1)))
        return sorted(ids)

    # ------------------------------------------------------------------ writes

    def _transact(
        self, ids: dict[str, list[int]], update: Update, days: Sequence[int] = ()
    ) -> None:
        keys = [(entity, i, self._key(entity, i)) for entity, group in ids.items() for i in group]
        day_keys = [self._cms_key(d) for d in days]
        watched = [self._meta_key, *[k for _, _, k in keys], *day_keys]
        with self._writes.pipeline(transaction=True) as pipe:
            for _ in range(MAX_ATTEMPTS):
                try:
                    pipe.watch(*watched)
                    raw = pipe.eval(_READ_STATES, len(watched), *watched, len(keys))
                    snapshot = Snapshot(states={e: {} for e in ids}, histories={}, meta=raw[0])
                    entity_raw = raw[1 : len(keys) + 1]
                    for (entity, i, _), (s, h) in zip(keys, entity_raw, strict=True):
                        snapshot.states[entity][i] = s
                        if entity == "user":
                            snapshot.histories[i] = h
                    snapshot.cms = dict(zip(days, raw[len(keys) + 1 :], strict=True))
                    writes = update(snapshot)
                    pipe.multi()
                    self._queue(pipe, writes)
                    pipe.execute()
                    return
                except redis_client.WatchError:
                    continue
        raise OnlineStoreError(
            self.backend, f"update of {len(keys)} keys lost {MAX_ATTEMPTS} races to other writers"
        )

    def _queue(self, pipe: Any, writes: Writes) -> None:
        for entity, records in writes.records.items():
            for i, v, s, h in records:
                fields = {"v": v, "s": s} if h is None else {"v": v, "s": s, "h": h}
                pipe.hset(self._key(entity, i), mapping=fields)
        for day, cms in sorted(writes.cms.items()):
            if cms is None:
                pipe.delete(self._cms_key(day))
            else:
                pipe.set(self._cms_key(day), cms)
        if writes.meta is not None:
            pipe.set(self._meta_key, writes.meta)

    def _replace(self, writes: Writes) -> None:
        for entity, records in writes.records.items():
            for chunk in chunks(records, CHUNK_ENTITIES):
                pipe = self._writes.pipeline(transaction=True)
                for i, _, _, _ in chunk:
                    # Whole-record replace: no field of an older layout survives.
                    pipe.delete(self._key(entity, i))
                self._queue(pipe, Writes({entity: chunk}))
                pipe.execute()
        if writes.cms:
            pipe = self._writes.pipeline(transaction=True)
            self._queue(pipe, Writes({}, cms=writes.cms))
            pipe.execute()
        if writes.meta is not None:
            self._writes.set(self._meta_key, writes.meta)

    def clear(self) -> None:
        prefix = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix)
        keys = [
            k
            for tag in _TAGS.values()
            for k in self._scan(f"{prefix}:{tag}:*")
            if any(p.match(k) for p in self._id_pattern.values())
        ]
        keys += [k for k in self._scan(f"{prefix}:cms:*") if self._cms_pattern.match(k)]
        for chunk in chunks(keys, CHUNK_ENTITIES):
            self._writes.delete(*chunk)
        self._writes.delete(self._meta_key)

    def close(self) -> None:
        self._reads.close()
        self._writes.close()
