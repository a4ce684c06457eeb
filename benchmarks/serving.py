"""Serving latency: open-loop HTTP load on the Ray Serve app, against the same request path in process.

    python benchmarks/serving.py --json out.json [--rates 25,50,100,150,200] [--duration 20]
        [--workdir /tmp/rayrec-bench-serving] [--set key=value ...]

Protocol:

- World: the ``tiny`` preset's simulator and models grown to a catalogue of
  100,000 items (2,000 users, 5 days, 10,000 impressions a day, one epoch per
  model; ``WORLD`` below, later ``--set`` overrides win), served with
  ``serving.candidates=100``: a personalised request reranks 100 candidates.
  Built by the pipeline itself (untracked, up to ``finetune_ranker``,
  ``index`` and ``materialize``) in ``--workdir``; a rerun with the same
  config and code skips every step (``world_build_s`` then is the check only).
- Requests: ``GET /v1/recommendations/{user_id}?k=K``, users drawn (seeded) from
  those the online store holds and the two-tower was trained on (the
  personalised path) and, with probability ``--unknown-share``, ids nobody has
  (the popularity fallback, ``fallback: true``); the answered fallback share
  is reported.
- Floor and baseline: the same request path called in process
  (:meth:`serving.recommender.Recommender.recommend` on the same published
  models and online store, the same clock), no HTTP, no Serve, no Ray running:
  ``--inprocess-requests`` sequential requests of the same mix. The HTTP p50
  at the lowest rate over the in-process p50 is what the proxy, HTTP and the
  replica hop add.
- Served: a fresh local Ray started here (``num_cpus=2``), the app deployed by
  :func:`serving.app.run_app` on a free port of 127.0.0.1 with the config's
  ``serving.app`` (one replica, 1 CPU, its queue bounds), ready once
  ``/readyz`` answers 200. Serve and Ray are shut down at the end.
- Load: a separate process (this script with ``--load-client``; asyncio and
  aiohttp, a keep-alive pool of ``--connections``) sends at each fixed rate,
  open loop: request i is due at ``t0 + i / rate`` (``--arrivals poisson``:
  exponential gaps) and goes out then whether or not earlier ones were
  answered; its latency runs from the due time, so time queued in the client,
  the pool, the proxy or the replica counts. ``--duration`` s per rate (at
  most 60), after a discarded ``--warmup`` s at the lowest rate. A request
  fails on a status other than 200, no answer within ``--timeout`` s, a
  connection error, or a 200 without k items. ``p50_ms``/``p99_ms`` are over
  the answered requests, ``error_rate`` is failures / sent, ``achieved_qps``
  the answered requests per second from the first due time until every request
  has its outcome. The client shares the 2 cores with Ray: its own dispatch
  lag (sent minus due, ``send_lag_p99_ms``) and CPU share
  (``client_cpu_share``) are reported. Per rate, the CPU time of this run's
  processes (from /proc: the replica, the proxy, the rest of Ray) per answered
  request, and the machine's busy time that was not ours
  (``foreign_cpu_share``, with the other Ray instances running): shared
  machines drift, and a run beside someone's test suite is not a capacity
  figure.
- A rate holds when its p99 <= 50 ms and nothing failed. Issue 6's bar: 100
  requests/s holds; ``max_rate_holding_p99_50ms`` is the highest rate that
  holds with every lower rate holding too. Also reported per rate: the
  replica's own time per request (``timings_ms.total`` of the answers) and the
  share of personalised answers served in retrieval order because the request
  was already past ``serving.deadline_ms`` at the rerank
  (``not_reranked_share``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name
# would shadow the `features` package: drop the folder before importing it.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

# Only the standard library and aiohttp at module level: the load client runs
# this file too and stays light; the driver imports the platform in main().

# The 100k-item world (module doc); later --set overrides win.
WORLD = (
    "simulator.n_items=100000",
    "simulator.n_users=2000",
    "simulator.impressions_per_day=10000",
    "models.retrieval.epochs=1",
    "models.ranker.epochs=1",
    "models.split.kind=temporal",
    "models.ranker.retrieval_score=true",
    "serving.candidates=100",
)
BUILD_STEPS = ("finetune_ranker", "index", "materialize")
BAR_RATE = 100.0
BAR_P99_MS = 50.0
MAX_DURATION_S = 60.0
# Ids no user has: the fallback path (far above any simulated id).
UNKNOWN_BASE = 1_000_000_000


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --------------------------------------------------------------------------- load client


def due_offsets(rate: float, n: int, arrivals: str, seed: int) -> list[float]:
    """Seconds after t0 at which each of ``n`` requests is due."""
    if arrivals == "uniform":
        return [i / rate for i in range(n)]
    rng = random.Random(seed)
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def open_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """Send ``rate * duration_s`` requests at their due times; per-request outcomes summarised."""
    import aiohttp

    cpu_start = time.process_time()
    rate, k = float(spec["rate"]), int(spec["k"])
    n = max(1, round(rate * float(spec["duration_s"])))
    due = due_offsets(rate, n, spec["arrivals"], int(spec["seed"]))
    users = spec["users"]
    paths = [f"/v1/recommendations/{users[i % len(users)]}?k={k}" for i in range(n)]
    # (latency s from due, send lag s, outcome, fallback, reranked, server total ms)
    records: list[tuple[float, float, str, bool | None, bool | None, float | None]] = []
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=int(spec["connections"]))
    timeout = aiohttp.ClientTimeout(total=float(spec["timeout_s"]))

    async with aiohttp.ClientSession(spec["url"], connector=connector, timeout=timeout) as session:

        async def one(path: str, due_at: float) -> None:
            sent = loop.time()
            outcome, fallback, reranked, server_ms = "ok", None, None, None
            try:
                async with session.get(path) as response:
                    body = await response.read()
                    status = response.status
                if status != 200:
                    outcome = f"http_{status}"
                else:
                    answer = json.loads(body)
                    fallback, reranked = answer["fallback"], answer["reranked"]
                    server_ms = answer["timings_ms"].get("total")
                    if len(answer["items"]) != k:
                        outcome = "short_answer"
            except TimeoutError:
                outcome = "timeout"
            except aiohttp.ClientError as exc:
                outcome = type(exc).__name__
            records.append(
                (loop.time() - due_at, sent - due_at, outcome, fallback, reranked, server_ms)
            )

        t0 = loop.time() + 0.05
        tasks = []
        for path, offset in zip(paths, due, strict=True):
            delay = t0 + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(path, t0 + offset)))
        await asyncio.gather(*tasks)
        span = loop.time() - t0
    summary = summarise(records, rate, n, span, spec)
    summary["client_cpu_share"] = (time.process_time() - cpu_start) / span
    summary["loadavg_1m_after"] = os.getloadavg()[0]
    return summary


def summarise(
    records: list[tuple[float, float, str, bool | None, bool | None, float | None]],
    rate: float,
    n: int,
    span: float,
    spec: dict[str, Any],
) -> dict[str, Any]:
    ok = [r for r in records if r[2] == "ok"]
    latencies = [r[0] * 1e3 for r in ok]
    lags = [r[1] * 1e3 for r in records]
    server = [r[5] for r in ok if r[5] is not None]
    personal = [r for r in ok if r[3] is False]
    errors = Counter(r[2] for r in records if r[2] != "ok")

    def pct(values: list[float], q: float) -> float | None:
        return percentile(values, q) if values else None

    return {
        "rate": rate,
        "arrivals": spec["arrivals"],
        "duration_s": float(spec["duration_s"]),
        "sent": n,
        "answered": len(ok),
        "p50_ms": pct(latencies, 0.50),
        "p90_ms": pct(latencies, 0.90),
        "p99_ms": pct(latencies, 0.99),
        "max_ms": max(latencies) if latencies else None,
        "achieved_qps": len(ok) / span if span > 0 else 0.0,
        "error_rate": (n - len(ok)) / n,
        "errors": dict(errors),
        "fallback_share": sum(1 for r in ok if r[3]) / len(ok) if ok else None,
        "not_reranked_share": (
            sum(1 for r in personal if not r[4]) / len(personal) if personal else None
        ),
        "server_p50_ms": pct(server, 0.50),
        "server_p99_ms": pct(server, 0.99),
        "send_lag_p50_ms": pct(lags, 0.50),
        "send_lag_p99_ms": pct(lags, 0.99),
    }


def load_client(spec_path: Path) -> int:
    """``--load-client SPEC``: run one open-loop rate, write its summary to ``spec["out"]``."""
    spec = json.loads(spec_path.read_text())
    result = asyncio.run(open_loop(spec))
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- driver


def world_config(args: argparse.Namespace, port: int) -> Any:
    from infra.config import load_config

    overrides = [f"paths.workdir={args.workdir}", *WORLD, *args.set]
    overrides += ["serving.app.host=127.0.0.1", f"serving.app.port={port}"]
    return load_config("tiny", overrides, environ={})


def build_world(config: Any) -> tuple[float, dict[str, dict[str, Any]]]:
    """Run (or skip, when current) the steps serving needs; seconds and each step's record."""
    from pipelines.main import MAIN
    from pipelines.runner import run_pipeline

    start = time.perf_counter()
    steps: dict[str, dict[str, Any]] = {}
    for until in BUILD_STEPS:
        record = run_pipeline(MAIN, config, until=until, track=False)
        for step in record.steps:
            if step.status == "ran" or step.name not in steps:
                steps[step.name] = {
                    "status": step.status,
                    "seconds": step.duration_s,
                    "rows": step.row_counts,
                }
    return time.perf_counter() - start, steps


def request_users(recommender: Any, n: int, unknown_share: float, seed: int) -> list[int]:
    """``n`` user ids: known users (store and two-tower), unknown ids with ``unknown_share``."""
    tower_users = recommender.bundle.two_tower.config.n_users
    known = [u for u in range(tower_users) if recommender.store.read_user(u).found]
    if not known:
        raise SystemExit("the online store holds no user the two-tower knows: nothing personalised")
    rng = random.Random(seed)
    return [
        UNKNOWN_BASE + rng.randrange(10**6) if rng.random() < unknown_share else rng.choice(known)
        for _ in range(n)
    ]


def in_process(recommender: Any, users: list[int], k: int, warmup: int) -> dict[str, Any]:
    """Sequential :meth:`Recommender.recommend` calls: latency, stage medians, path shares."""
    from serving.schemas import RecommendationRequest

    for user in users[:warmup]:
        recommender.recommend(RecommendationRequest(user_id=user, k=k))
    latencies, fallbacks, personal, not_reranked = [], 0, 0, 0
    stages: dict[str, list[float]] = {}
    for user in users:
        start = time.perf_counter()
        response = recommender.recommend(RecommendationRequest(user_id=user, k=k))
        latencies.append((time.perf_counter() - start) * 1e3)
        fallbacks += response.fallback
        if not response.fallback:
            personal += 1
            not_reranked += not response.reranked
            for stage, ms in response.timings_ms.items():
                stages.setdefault(stage, []).append(ms)
    return {
        "inprocess_requests": len(users),
        "inprocess_p50_ms": statistics.median(latencies),
        "inprocess_p99_ms": percentile(latencies, 0.99),
        "inprocess_fallback_share": fallbacks / len(users),
        "inprocess_not_reranked_share": not_reranked / personal if personal else None,
        **{f"inprocess_personal_{s}_p50_ms": statistics.median(v) for s, v in stages.items()},
    }


def raylets() -> int:
    """Raylet processes on this machine: each is a Ray instance (others' ones compete for the cores)."""
    count = 0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            count += comm.read_text().strip() == "raylet"
        except OSError:
            continue
    return count


def _proc_stat(pid: str) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _role(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "ray_other"
    for needle, role in (("ServeReplica", "replica"), ("ProxyActor", "proxy")):
        if needle in cmdline:
            return role
    return "client" if "--load-client" in cmdline else "ray_other"


def cpu_sample() -> dict[str, float]:
    """CPU seconds so far of this driver's descendants by role (replica, proxy, client,
    ray_other: controller, raylet, GCS, idle workers), and the machine's busy and total
    seconds over all cores (/proc/stat)."""
    stats = {pid: _proc_stat(pid) for pid in (p.name for p in Path("/proc").glob("[0-9]*"))}
    parents = {int(pid): st[0] for pid, st in stats.items() if st is not None}
    root = os.getpid()
    out = {"replica": 0.0, "proxy": 0.0, "client": 0.0, "ray_other": 0.0}
    for pid, st in stats.items():
        if st is None or int(pid) == root:
            continue
        ancestor, seen = parents.get(int(pid)), 0
        while ancestor not in (None, 0, 1, root) and seen < 64:
            ancestor, seen = parents.get(ancestor), seen + 1
        if ancestor == root:
            out[_role(int(pid))] += st[1]
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    out["machine_total"] = sum(ticks[:8]) / hz
    out["machine_busy"] = (sum(ticks[:8]) - ticks[3] - ticks[4]) / hz
    return out


def cpu_use(before: dict[str, float], after: dict[str, float], answered: int) -> dict[str, float]:
    """Where the CPU went over one rate: ms per answered request by role, and shares of the
    machine's capacity (``foreign_cpu_share``: busy time that was not ours)."""
    delta = {key: after[key] - before[key] for key in before}
    total = max(delta["machine_total"], 1e-9)
    ours = sum(delta[r] for r in ("replica", "proxy", "client", "ray_other"))
    out = {
        f"cpu_ms_per_answer_{r}": delta[r] * 1e3 / answered if answered else None
        for r in ("replica", "proxy", "ray_other")
    }
    out["our_cpu_share"] = ours / total
    out["machine_busy_share"] = delta["machine_busy"] / total
    out["foreign_cpu_share"] = max(0.0, delta["machine_busy"] - ours) / total
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"{exc.code} {exc.read()[:200]!r}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise SystemExit(f"{url}/readyz not 200 after {timeout_s} s (last: {last})")


def run_client(
    url: str, rate: float, duration: float, users: list[int], args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    """One rate, from a separate process (this script, ``--load-client``)."""
    spec_path, out = tmp / f"spec-{rate:g}.json", tmp / f"out-{rate:g}.json"
    spec = {
        "url": url,
        "rate": rate,
        "duration_s": duration,
        "users": users,
        "k": args.k,
        "arrivals": args.arrivals,
        "seed": args.seed,
        "timeout_s": args.timeout,
        "connections": args.connections,
        "out": str(out),
    }
    spec_path.write_text(json.dumps(spec))
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--load-client", str(spec_path)],
        check=True,
        timeout=duration + args.timeout + 60,
    )
    return json.loads(out.read_text())


def served_rates(
    config: Any, sources: Any, users: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    """Start Ray, deploy the app, run the warm-up and every rate; stop what was started."""
    import ray
    from ray import serve

    from serving.app import ingress_environment, run_app
    from serving.service import ServedModels

    app = config.serving.app
    ingress_environment(config)  # serving.app.proxy: HAProxy or Serve's Python proxy
    url = f"http://{app.host}:{app.port}"
    memory = config.ray.object_store_memory_mb
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=memory * 1024 * 1024 if memory else None,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        start = time.perf_counter()
        run_app(config, ServedModels.of(sources, 1), timeout_s=300.0)
        wait_ready(url, 300.0)
        deploy_s = time.perf_counter() - start
        print(f"app ready at {url} in {deploy_s:.1f} s", flush=True)
        rates: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as tmp:
            if args.warmup > 0:
                warm = run_client(url, min(args.rates), args.warmup, users, args, Path(tmp))
                print(f"warm-up {warm['rate']:g} req/s: p50 {warm['p50_ms']} ms", flush=True)
            for rate in args.rates:
                time.sleep(1.0)  # let the previous rate's queue drain
                before = cpu_sample()
                result = run_client(url, rate, args.duration, users, args, Path(tmp))
                result.update(cpu_use(before, cpu_sample(), result["answered"]))
                result["other_ray_instances_after"] = raylets() - 1
                rates[f"{rate:g}"] = result
                print(
                    f"{rate:g} req/s: p50 {_f(result['p50_ms'])} ms, p99 {_f(result['p99_ms'])} ms, "
                    f"errors {result['error_rate']:.3f}",
                    flush=True,
                )
        return {"deploy_s": deploy_s, "url": url, "rates": rates}
    finally:
        serve.shutdown()
        ray.shutdown()


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def holds(result: dict[str, Any]) -> bool:
    return (
        result["p99_ms"] is not None
        and result["p99_ms"] <= BAR_P99_MS
        and result["error_rate"] == 0.0
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--workdir", default=str(Path(tempfile.gettempdir()) / "rayrec-bench-serving")
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--rates",
        type=lambda s: sorted({float(r) for r in s.split(",")}),
        default="25,50,100,150,200",
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per rate (<= 60)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds at the lowest rate")
    parser.add_argument("--timeout", type=float, default=2.0, help="per-request timeout, s")
    parser.add_argument("--connections", type=int, default=256, help="client keep-alive pool")
    parser.add_argument("--arrivals", choices=("uniform", "poisson"), default="uniform")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--unknown-share", type=float, default=0.1)
    parser.add_argument("--inprocess-requests", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load-client", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_client is None:
        if args.json is None:
            parser.error("--json is required")
        if not 0 < args.duration <= MAX_DURATION_S:
            parser.error(f"--duration must be in (0, {MAX_DURATION_S:g}] s")
        if not 0 <= args.warmup <= MAX_DURATION_S:
            parser.error(f"--warmup must be in [0, {MAX_DURATION_S:g}] s")
        if not args.rates or min(args.rates) <= 0:
            parser.error("--rates must be positive")
        if not 0.0 <= args.unknown_share <= 1.0:
            parser.error("--unknown-share must be in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.load_client is not None:
        return load_client(args.load_client)

    import ray

    from pipelines.serving_sources import published_sources
    from serving.recommender import Recommender

    busy = {"loadavg_1m_at_start": os.getloadavg()[0], "other_ray_instances_at_start": raylets()}
    config = world_config(args, free_port())
    build_s, steps = build_world(config)
    if ray.is_initialized():  # the training steps started one; the floor runs without it
        ray.shutdown()
    sources = published_sources(config)
    n_users = max(args.inprocess_requests, round(max(args.rates) * args.duration), 1)
    recommender = Recommender.load(sources, config.serving, config.features, config.paths.workdir)
    try:
        users = request_users(recommender, n_users, args.unknown_share, args.seed)
        catalogue = len(recommender.catalogue)
        floor = in_process(recommender, users[: args.inprocess_requests], args.k, warmup=100)
    finally:
        recommender.close()
    del recommender
    print(
        f"in process: p50 {floor['inprocess_p50_ms']:.2f} ms, p99 {floor['inprocess_p99_ms']:.2f} ms",
        flush=True,
    )

    served = served_rates(config, sources, users, args)
    rates = served["rates"]
    lowest = rates[f"{min(args.rates):g}"]
    # The highest rate that holds with every lower rate holding too (one lucky
    # rate above a failing one is noise, not capacity).
    holding: list[float] = []
    for rate in args.rates:
        if not holds(rates[f"{rate:g}"]):
            break
        holding.append(rate)
    bar = rates.get(f"{BAR_RATE:g}")
    result: dict[str, Any] = {
        "catalogue_items": catalogue,
        "candidates": config.serving.candidates,
        "proxy": config.serving.app.proxy,
        "replicas": config.serving.app.num_replicas,
        "k": args.k,
        "world": [*WORLD, *args.set],
        "workdir": args.workdir,
        "world_build_s": build_s,
        "world_steps": steps,
        "model_versions": dict(sources.versions),
        "unknown_share": args.unknown_share,
        "arrivals": args.arrivals,
        "timeout_s": args.timeout,
        "serving_app": config.serving.app.model_dump(mode="json"),
        "deadline_ms": config.serving.deadline_ms,
        "deploy_s": served["deploy_s"],
        **busy,
        **floor,
        "rates": rates,
        "http_p50_over_inprocess_p50": (
            lowest["p50_ms"] / floor["inprocess_p50_ms"] if lowest["p50_ms"] else None
        ),
        "bar": f"{BAR_RATE:g} req/s: p99 <= {BAR_P99_MS:g} ms, no errors",
        "bar_met": holds(bar) if bar is not None else None,
        "max_rate_holding_p99_50ms": max(holding) if holding else None,
    }
    ran = {name: s["seconds"] for name, s in steps.items() if s["status"] == "ran"}
    print(
        f"\nworld: {catalogue:,} items in the catalogue, {config.serving.candidates} candidates "
        f"reranked, k={args.k}; built in {build_s:.1f} s"
        + (f" (slowest step {max(ran, key=ran.get)} {max(ran.values()):.1f} s)" if ran else "")
    )
    print(
        f"in process (floor): p50 {floor['inprocess_p50_ms']:.2f} ms, p99 "
        f"{floor['inprocess_p99_ms']:.2f} ms over {floor['inprocess_requests']} requests, "
        f"fallback share {floor['inprocess_fallback_share']:.2f}; personalised stage p50s: "
        + ", ".join(
            f"{key.removeprefix('inprocess_personal_').removesuffix('_p50_ms')} {v:.2f}"
            for key, v in floor.items()
            if key.startswith("inprocess_personal_")
        )
    )
    print(
        f"{'rate':>6}{'achieved':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}"
        f"{'srv p50':>9}{'srv p99':>9}{'fallback':>10}{'no rerank':>11}  holds"
    )
    for rate, v in rates.items():
        print(
            f"{rate:>6}{v['achieved_qps']:>10.1f}{_f(v['p50_ms']):>9}{_f(v['p99_ms']):>9}"
            f"{_f(v['max_ms']):>9}{v['error_rate']:>8.3f}{_f(v['server_p50_ms']):>9}"
            f"{_f(v['server_p99_ms']):>9}{_f(v['fallback_share'], 2):>10}"
            f"{_f(v['not_reranked_share'], 2):>11}  {'yes' if holds(v) else 'no'}"
        )
        if v["errors"]:
            print(f"{'':>6}errors: {v['errors']}")
    print(
        f"\nCPU per answered request (ms) and shares of the {os.cpu_count()} cores, by rate\n"
        f"{'rate':>6}{'replica':>9}{'proxy':>9}{'ray other':>11}{'ours':>7}{'client':>8}"
        f"{'foreign':>9}{'lag p99 ms':>12}"
    )
    for rate, v in rates.items():
        print(
            f"{rate:>6}{_f(v['cpu_ms_per_answer_replica']):>9}{_f(v['cpu_ms_per_answer_proxy']):>9}"
            f"{_f(v['cpu_ms_per_answer_ray_other']):>11}{v['our_cpu_share']:>7.2f}"
            f"{v['client_cpu_share'] / (os.cpu_count() or 1):>8.2f}{v['foreign_cpu_share']:>9.2f}"
            f"{_f(v['send_lag_p99_ms']):>12}"
        )
    others = max(v["other_ray_instances_after"] for v in rates.values())
    foreign = max(v["foreign_cpu_share"] for v in rates.values())
    if busy["other_ray_instances_at_start"] or others or foreign > 0.1:
        print(
            f"note: the machine was not idle (up to {foreign:.0%} of its CPU used by others "
            f"during a rate; other Ray instances: {busy['other_ray_instances_at_start']} at "
            f"start, up to {others} after a rate): the times include their work"
        )
    ratio = result["http_p50_over_inprocess_p50"]
    print(
        f"HTTP p50 at {min(args.rates):g} req/s / in-process p50: {_f(ratio, 2)}x; "
        f"bar ({result['bar']}): "
        f"{'not measured' if bar is None else 'met' if result['bar_met'] else 'NOT met'}; "
        f"highest rate holding p99 <= {BAR_P99_MS:g} ms: "
        f"{_f(result['max_rate_holding_p99_50ms'], 0)} req/s"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
