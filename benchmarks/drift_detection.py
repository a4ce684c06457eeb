"""Drift detection on the simulator: injected drifts on known days, clean windows, e-mails.

    python benchmarks/drift_detection.py --json benchmarks/results/drift_detection.json

World: the ``default`` preset's simulator at a third of its traffic (sizes in
the JSON's ``world``), without its own drift schedule. Protocol, as the
platform runs in production:

1. **Train** on days ``0 .. T-1``: the main pipeline up to
   ``reference_profile`` (features, both models, fine-tune, the reference
   profile of the reranker that serves). Tuning is off (minutes, not hours).
2. For each drift kind (``covariate``, ``concept``, ``popularity_shock``) the
   log grows to ``N`` days with that one drift scheduled on day ``D``, in a
   copy of the trained workdir: the simulator's keyed random streams keep
   every day before ``D`` identical to the training world (so the models and
   the reference are the ones a deployment would hold), and ``features``
   reruns on the grown log.
3. ``rayrec monitor run`` (:func:`pipelines.monitor.run_monitoring`) on every
   daily window from ``T`` to ``N-1``, in day order, e-mailing a real
   aiosmtpd server on 127.0.0.1 (one recipient per drift kind, so each
   world's e-mails are counted apart). Windows ``T .. D-1`` are clean
   (``10`` per world: ``30`` in all, the three worlds' copies of the same days);
   ``D .. N-1`` follow the drift.

Keys per drift: ``detected`` (a finding of the expected kind, naming an
expected feature, within one window of ``D``), ``delay_windows`` (first such
window minus ``D``), ``emails_received`` (e-mails on and after ``D``; the bar
is one: a drift that persists is mailed once), ``named`` (the features or
metrics those e-mails name); overall ``false_alerts`` (windows before ``D``
with any finding) and ``clean_emails``. ``checks`` holds each window's
drifted columns and statistics for the record.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name
# would shadow the `features` package: drop the folder before importing it.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import datetime as dt
import email
import email.policy
import json
import shutil
import socket
import tempfile
import time
from typing import Any

from infra.config import RayrecConfig, load_config
from infra.logs import configure_logging

# What each drift must be named by: finding-key prefixes and, for data drift,
# features of which at least one must be named.
EXPECTED: dict[str, dict[str, Any]] = {
    # A new user segment brings its own users: their attributes and activity.
    "covariate": {
        "findings": ("data_drift",),
        "features": ("user_segment", "user_age_bucket", "user_device", "user_activity"),
    },
    # Same users and items, other clicks: the model's quality is what moves.
    "concept": {"findings": ("concept_drift",), "features": ()},
    # A few items' popularity jumps: the popularity head, the items' recent counts.
    "popularity_shock": {
        "findings": ("data_drift", "popularity_head"),
        "features": (
            "item_events_1d",
            "item_impressions_1d",
            "item_clicks_1d",
            "item_positives_1d",
            "popularity_head",
        ),
    },
}
DRIFTS: dict[str, str] = {
    "covariate": "{kind: covariate, day: %d, strength: 0.3}",
    "concept": "{kind: concept, day: %d, strength: 0.5}",
    "popularity_shock": "{kind: popularity_shock, day: %d, strength: 0.02, boost: 20.0}",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Inbox:
    """aiosmtpd handler keeping every message."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        self.messages.append(message)  # type: ignore[arg-type]
        return "250 Message accepted"


def world_overrides(
    args: argparse.Namespace, workdir: Path, days: int, drift: str | None
) -> list[str]:
    drifts = "[]" if drift is None else "[" + DRIFTS[drift] % args.drift_day + "]"
    return [
        f"paths.workdir={workdir}",
        f"simulator.seed={args.seed}",
        f"simulator.n_users={args.users}",
        f"simulator.n_items={args.items}",
        f"simulator.impressions_per_day={args.impressions}",
        f"simulator.n_days={days}",
        f"simulator.drifts={drifts}",
        "models.ranker.tuning.enabled=false",
        "models.retrieval.epochs=1",
        "serving.app.deploy_after_run=false",
    ]


def smtp_overrides(port: int, recipient: str) -> list[str]:
    return [
        "monitoring.alerts.smtp.host=127.0.0.1",
        f"monitoring.alerts.smtp.port={port}",
        f"monitoring.alerts.smtp.recipients=[{recipient}]",
        "monitoring.alerts.attempts=1",
    ]


def run_until(config: RayrecConfig, step: str) -> float:
    from pipelines.main import MAIN
    from pipelines.runner import run_pipeline

    started = time.perf_counter()
    record = run_pipeline(MAIN, config, until=step, track=False)
    if record.status != "succeeded":
        raise SystemExit(f"pipeline up to {step} ended {record.status}")
    return time.perf_counter() - started


def monitor_world(
    args: argparse.Namespace, config: RayrecConfig, inbox: Inbox, recipient: str
) -> list[dict[str, Any]]:
    """One monitor run per daily window from T to N-1; what each found and sent."""
    from pipelines.monitor import run_monitoring

    start = config.simulator.start_date
    windows: list[dict[str, Any]] = []
    for day in range(args.train_days, args.days):
        before = len(inbox.messages)
        record = run_monitoring(config, start + dt.timedelta(days=day + 1), 1, track=False)
        mails = [m for m in inbox.messages[before:] if recipient in str(m["To"])]
        windows.append(
            {
                "day": day,
                "findings": record.findings,
                "sent": list(record.delivery.sent) if record.delivery else [],
                "emails": [{"subject": str(m["Subject"]), "named": named_in(m)} for m in mails],
                "drifted": [
                    {"check": c["check"], "column": c["column"], "statistic": c["statistic"]}
                    for c in record.checks
                    if c["drifted"]
                ],
                # The vector checks' numbers on every window (drifted or not): how far
                # the healthy days sit below their thresholds.
                "embedding": {
                    c["column"]: {
                        "statistic": c["statistic"],
                        "threshold": c["threshold"],
                        "judged": c["judged"],
                    }
                    for c in record.checks
                    if c["check"] == "embedding"
                },
                "seconds": round(record.seconds, 2),
            }
        )
        print(
            f"  day {day:2d}: findings {record.findings or '-'}; "
            f"drifted {[d['column'] for d in windows[-1]['drifted']]}; e-mails {len(mails)}"
        )
    return windows


def named_in(message: email.message.EmailMessage) -> list[str]:
    """The finding keys and feature names the plain-text body names."""
    body = message.get_body(preferencelist=("plain",))
    text = body.get_content() if body is not None else ""
    named = []
    for line in text.splitlines():
        if "(finding: " in line:
            named.append(line.rsplit("(finding: ", 1)[1].rstrip(")"))
        elif line.startswith("  ") and line.split() and line.split()[0] != "feature":
            named.append(line.split()[0])
    return named


def judge(kind: str, windows: list[dict[str, Any]], drift_day: int) -> dict[str, Any]:
    expected = EXPECTED[kind]
    clean = [w for w in windows if w["day"] < drift_day]
    after = [w for w in windows if w["day"] >= drift_day]

    def hit(window: dict[str, Any]) -> bool:
        keys = [f for f in window["findings"] if f.startswith(expected["findings"])]
        if not keys:
            return False
        if not expected["features"]:
            return True
        columns = {d["column"] for d in window["drifted"]} | {f.split(":")[-1] for f in keys}
        return bool(columns & set(expected["features"]))

    first = next((w["day"] for w in after if hit(w)), None)
    delay = None if first is None else first - drift_day
    emails = [e for w in after for e in w["emails"]]
    return {
        "detected": delay is not None and delay <= 1,
        "delay_windows": delay,
        "emails_received": len(emails),
        "named": sorted({n for e in emails for n in e["named"]}),
        "false_alerts": sum(1 for w in clean if w["findings"]),
        "clean_windows": len(clean),
        "clean_emails": sum(len(w["emails"]) for w in clean),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--impressions", type=int, default=20_000)
    parser.add_argument("--train-days", type=int, default=18)
    parser.add_argument("--clean-windows", type=int, default=10)
    parser.add_argument("--after-windows", type=int, default=4)
    parser.add_argument("--kinds", nargs="+", default=list(DRIFTS), choices=list(DRIFTS))
    parser.add_argument("--keep", type=Path, default=None, help="keep the workdirs here")
    args = parser.parse_args(argv)
    args.drift_day = args.train_days + args.clean_windows
    args.days = args.drift_day + args.after_windows

    from aiosmtpd.controller import Controller

    root = args.keep or Path(tempfile.mkdtemp(prefix="rayrec-drift-"))
    root.mkdir(parents=True, exist_ok=True)
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    report: dict[str, Any] = {
        "world": {
            "users": args.users,
            "items": args.items,
            "impressions_per_day": args.impressions,
            "train_days": args.train_days,
            "drift_day": args.drift_day,
            "days": args.days,
            "seed": args.seed,
        },
        "drifts": {},
    }
    try:
        base = root / "trained"
        config = load_config("default", world_overrides(args, base, args.train_days, None))
        configure_logging(config.logging)
        print(f"training on days 0..{args.train_days - 1} in {base}")
        report["train_s"] = round(run_until(config, "reference_profile"), 1)
        for kind in args.kinds:
            workdir = root / kind
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.copytree(base, workdir, symlinks=True)
            recipient = f"{kind}@example.com"
            config = load_config(
                "default",
                world_overrides(args, workdir, args.days, kind) + smtp_overrides(port, recipient),
            )
            print(f"{kind}: drift on day {args.drift_day}, log grows to {args.days} days")
            grow_s = run_until(config, "features")
            windows = monitor_world(args, config, inbox, recipient)
            result = judge(kind, windows, args.drift_day)
            result.update({"grow_s": round(grow_s, 1), "windows": windows})
            report["drifts"][kind] = result
    finally:
        controller.stop()
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    drifts = report["drifts"]
    report["false_alerts"] = sum(d["false_alerts"] for d in drifts.values())
    report["clean_windows"] = sum(d["clean_windows"] for d in drifts.values())
    report["emails_received"] = {k: d["emails_received"] for k, d in drifts.items()}
    report["detected"] = {k: d["detected"] for k, d in drifts.items()}
    report["delay_windows"] = {k: d["delay_windows"] for k, d in drifts.items()}
    report["bar_met"] = (
        all(d["detected"] for d in drifts.values())
        and report["false_alerts"] == 0
        and all(d["emails_received"] == 1 for d in drifts.values())
    )
    print_table(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return report


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{'drift':18} {'detected':>8} {'delay':>5} {'e-mails':>7} {'false':>5}  named")
    for kind, d in report["drifts"].items():
        print(
            f"{kind:18} {d['detected']!s:>8} {d['delay_windows']!s:>5} "
            f"{d['emails_received']:>7} {d['false_alerts']:>5}  {', '.join(d['named'])[:80]}"
        )
    print(
        f"false alerts: {report['false_alerts']} of {report['clean_windows']} clean windows; "
        f"bar met: {report['bar_met']}"
    )


if __name__ == "__main__":
    main()
