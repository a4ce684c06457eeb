"""The public face of the simulator: :class:`ClickLogSimulator`."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from features.simulator.log import DaySchedule, Traffic, click_model, make_block
from features.simulator.policy import DayTables, LoggingPolicy, Slates
from features.simulator.world import World, examine_probability
from infra.config import SimulatorConfig
from infra.logs import track
from infra.storage import StoragePath

T = TypeVar("T")
DATASET_META = {"kind": "interactions", "name": "simulator", "ts_unit": "us"}


class ClickLogSimulator:
    """A seeded world of users and items, a logging policy, and a position-biased click model.

    Use it offline (``write`` / ``iter_event_chunks``: the logged events of the
    configured days) or online as the environment of an A/B simulation
    (``sample_users`` → your slates → ``respond``; ``sample_slates`` is the
    logging policy as a control arm; ``relevance`` / ``click_probability`` give
    the exact expected reward).

    ``threads`` only changes speed, never the output: every block of requests
    draws from its own keyed random stream.
    """

    def __init__(self, config: SimulatorConfig, threads: int | None = None) -> None:
        self.config = config
        self.threads = max(1, threads if threads is not None else min(4, os.cpu_count() or 1))
        self.world = World(config)
        self.policy = LoggingPolicy(self.world)
        self.traffic = Traffic(self.world)
        # Each request adds <= K impression rows and <= K rating rows, so a block of
        # this many requests never exceeds chunk_rows rows.
        rows_per_request = config.slate_size * (2 if config.rating_probability > 0 else 1)
        self.requests_per_block = config.chunk_rows // rows_per_request

    # ------------------------------------------------------------------ entities

    @property
    def users(self) -> pl.DataFrame:
        """``user_id, segment, age_bucket, device, activity`` (drift segments included)."""
        return self.world.users

    @property
    def items(self) -> pl.DataFrame:
        """``item_id, category, price, quality, first_seen`` (ids in order of first_seen)."""
        return self.world.items

    def n_live_items(self, day: int) -> int:
        """Items live on ``day`` are ids ``0 .. n_live_items(day) - 1``."""
        return self.world.n_live(day)

    def popularity(self, day: int) -> np.ndarray:
        """(N,) popularity weights on ``day`` (Zipf, times active popularity shocks)."""
        return self.world.popularity(day)

    # ------------------------------------------------------------------ ground truth

    def examine_probability(self, positions: npt.ArrayLike) -> np.ndarray:
        """P(examine | position), 0-based positions, same shape as ``positions``."""
        return examine_probability(positions, self.config.examine_decay)

    def relevance(self, user_ids: npt.ArrayLike, item_ids: npt.ArrayLike, day: int) -> np.ndarray:
        """True P(relevant | user, item) on ``day``; ids broadcast, e.g. (B, 1) with (B, K)."""
        return self.world.relevance(user_ids, item_ids, day)

    def click_probability(
        self, user_ids: npt.ArrayLike, slates: npt.ArrayLike, day: int
    ) -> np.ndarray:
        """(B, K) P(click) of slates (B, K) shown to users (B,) or one user, column = position."""
        users, items = self._as_requests(user_ids, slates)
        _, p_click = click_model(
            self.world, users, items, self.world.user_vectors(day), self.world.item_vectors
        )
        return p_click

    def respond(
        self,
        user_ids: npt.ArrayLike,
        slates: npt.ArrayLike,
        day: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """(B, K) bool clicks of users (B,) (or one user) on slates (B, K) on ``day``."""
        p_click = self.click_probability(user_ids, slates, day)
        return rng.random(p_click.shape) < p_click

    # ------------------------------------------------------------------ online use

    def sample_users(self, n: int, day: int, rng: np.random.Generator) -> np.ndarray:
        """(n,) user ids distributed like the traffic of ``day`` (activity, covariate drift)."""
        return self.traffic.sample_users(n, day, rng)

    def sample_slates(self, user_ids: npt.ArrayLike, day: int, rng: np.random.Generator) -> Slates:
        """The logging policy's slates (B, K) and propensities for users (B,) on ``day``."""
        return self.policy.sample(np.atleast_1d(np.asarray(user_ids, dtype=np.int64)), day, rng)

    @staticmethod
    def _as_requests(
        user_ids: npt.ArrayLike, slates: npt.ArrayLike
    ) -> tuple[np.ndarray, np.ndarray]:
        items = np.asarray(slates, dtype=np.int64)
        if items.ndim != 2:
            raise ValueError(f"slates must be (B, K) item ids, got shape {items.shape}")
        users = np.broadcast_to(np.asarray(user_ids, dtype=np.int64), items.shape[:1])
        return np.ascontiguousarray(users), items

    # ------------------------------------------------------------------ the log

    def iter_event_chunks(self, days: Iterable[int] | None = None) -> Iterator[pl.DataFrame]:
        """Events in the canonical contract, day by day, in chunks of <= ``chunk_rows`` rows.

        Each chunk holds whole requests of one day: one ``impression`` row per
        shown slot (``label`` 1.0 if clicked, ``position``, ``request_id``,
        ``propensity``), then the ``rating`` rows of that chunk's clicks
        (``value`` 1..5, ``label`` 1.0 when ``value >= 4``, same ``request_id``,
        null ``position`` / ``propensity``). Clicks are not separate rows: the
        impression label is the click (the joined form).
        """
        for _, _, table in self._tables(days, lambda table: table):
            yield pl.from_arrow(table)  # type: ignore[misc]

    def write(self, folder: StoragePath) -> dict[str, int]:
        """Write the dataset folder (see :mod:`features.dataset`); returns row counts.

        ``events/date=YYYY-MM-DD/part-XXXXX.parquet`` (one file per chunk),
        ``users.parquet``, ``items.parquet``, ``dataset.json``. ``folder`` should
        be a staging folder: the caller publishes it atomically.
        """
        folder.makedirs()
        events = folder.join("events")
        codec = self.config.compression

        def write_chunk(day: int, block: int, table: pa.Table) -> int:
            target = events.join(f"date={self._date(day)}")
            target.makedirs()
            pq.write_table(
                table,
                target.join(f"part-{block:05d}.parquet").path,
                filesystem=folder.fs,
                compression=codec,
            )
            return table.num_rows

        chunks = track(self._tables(None, None, write_chunk), "simulate: chunks written")
        n_events = sum(rows for _, _, rows in chunks)
        for name, frame in (("users.parquet", self.users), ("items.parquet", self.items)):
            pq.write_table(
                frame.to_arrow(), folder.join(name).path, filesystem=folder.fs, compression=codec
            )
        folder.join("dataset.json").write_text_atomic(json.dumps(DATASET_META))
        return {"events": n_events, "users": self.users.height, "items": self.items.height}

    def _date(self, day: int) -> str:
        return (self.config.start_date + dt.timedelta(days=day)).isoformat()

    def _tables(
        self,
        days: Iterable[int] | None,
        finish: Callable[[pa.Table], T] | None,
        write: Callable[[int, int, pa.Table], T] | None = None,
    ) -> Iterator[tuple[int, int, T]]:
        """Blocks in (day, block) order, made by ``threads`` workers, at most
        ``threads + 1`` in flight so memory stays bounded."""

        def task(schedule: DaySchedule, tables: DayTables, block: int) -> T:
            table = make_block(
                self.world, self.policy, tables, schedule, block, self.requests_per_block
            )
            if write is not None:
                return write(schedule.day, block, table)
            assert finish is not None
            return finish(table)

        chosen = list(range(self.config.n_days) if days is None else days)
        if any(not 0 <= day < self.config.n_days for day in chosen):
            raise ValueError(f"days must lie in 0 .. {self.config.n_days - 1}, got {chosen}")

        def jobs() -> Iterator[tuple[int, int, Callable[[], T]]]:
            for day in chosen:
                schedule = self.traffic.day_schedule(day)
                tables = self.policy.day_tables(day)  # built once, shared read-only
                n_blocks = -(-schedule.users.size // self.requests_per_block)
                for block in range(n_blocks):
                    yield day, block, lambda s=schedule, t=tables, b=block: task(s, t, b)

        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            pending: deque[tuple[int, int, Future[T]]] = deque()
            for day, block, job in jobs():
                pending.append((day, block, pool.submit(job)))
                if len(pending) > self.threads:
                    d, b, fut = pending.popleft()
                    yield d, b, fut.result()
            while pending:
                d, b, fut = pending.popleft()
                yield d, b, fut.result()
