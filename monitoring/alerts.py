"""Drift alert e-mails: typed findings, rendering, sent once, never lost.

A monitor run that finds drift hands an :class:`Alert` (its :class:`Finding` s
for one window, and the path of its Evidently report) to
:meth:`AlertSender.send`, which

1. drops findings already mailed for this (monitor, window, finding key): a
   rerun of a window sends nothing (``suppressed_duplicate``);
2. drops findings whose (monitor, finding key) was mailed within
   ``cooldown_hours`` (``suppressed_cooldown``; recorded): one e-mail per
   drift, not one per window of it. With ``cooldown_scope: monitor`` (the
   default) any finding of the monitor in cooldown holds back the others
   too: one drift shows in several checks over its first days (a new user
   segment moves the features on day 1 and the AUC on day 3), and it is one
   incident, mailed once; the later findings are in the reports and the ledger;
3. mails the rest as one e-mail (HTML table + plain-text alternative, a link to
   the report and the report attached only below ``max_attachment_kb``), with
   retries and backoff, and records them as sent only once the server took it;
4. when every attempt fails, appends the rendered alert (no secrets) to the
   dead-letter file, then raises :class:`AlertDeliveryError` or warns, as
   ``on_smtp_failure`` says. :meth:`AlertSender.resend_dead_letters` retries it later.

The cooldown clock is the windows' end times when both windows have one (so a
backfill of 30 days in a minute mails as the live daily runs would have), else
the wall-clock time of the last send. A finding is in cooldown when that gap is
at most ``cooldown_hours`` (daily windows, 24 h: the next day's window is
suppressed, the one after reminds).

State lives under ``<workdir>/monitoring/``: ``alert_ledger.jsonl`` (one line
per sent or suppressed finding) and ``dead_letter.jsonl`` (unless
``dead_letter`` names another place), guarded by a file lock held for the
whole decision and send, so two runs on one machine cannot both mail a
finding. Object-store workdirs keep the lock in the user's cache (it guards
one machine, like the pipeline lock).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import json
import os
import ssl
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infra.config import AlertConfig
from infra.logs import get_logger
from infra.storage import StoragePath
from monitoring.mail import (
    AlertDeliveryError,
    Attachment,
    SmtpFailure,
    SmtpTransport,
    build_message,
    one_line,
    send_test_email,
)

__all__ = [
    "Alert",
    "AlertDeliveryError",
    "AlertSender",
    "DeliveryReport",
    "FeatureDrift",
    "Finding",
    "RenderedAlert",
    "Window",
    "render_alert",
    "send_test_email",
    "summarize",
]

log = get_logger(__name__)

Severity = Literal["info", "warning", "critical"]
_SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}
_SEVERITY_COLOUR = {"info": "#0969da", "warning": "#9a6700", "critical": "#cf222e"}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- types


class Window(_Frozen):
    """The current window a monitor judged: ``start``/``end`` (UTC), an ``id``, or both.

    Naive datetimes are taken as UTC (the event log's ``ts`` is UTC).
    """

    start: dt.datetime | None = None
    end: dt.datetime | None = None
    id: str | None = None

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)

    @model_validator(mode="after")
    def _identified(self) -> Window:
        if self.id is None and (self.start is None or self.end is None):
            raise ValueError("a window needs an id or both start and end")
        if self.start is not None and self.end is not None and self.start > self.end:
            raise ValueError(f"window start {self.start} is after its end {self.end}")
        return self

    @property
    def key(self) -> str:
        """The window's identity in the ledger: its id, else ``start/end`` in ISO 8601."""
        if self.id is not None:
            return self.id
        assert self.start is not None and self.end is not None
        return f"{self.start.isoformat()}/{self.end.isoformat()}"

    @property
    def label(self) -> str:
        """For people: ``2024-03-02 00:00 – 2024-03-03 00:00 UTC`` (and/or the id)."""
        span = ""
        if self.start is not None and self.end is not None:
            span = f"{self.start:%Y-%m-%d %H:%M} – {self.end:%Y-%m-%d %H:%M} UTC"
        if self.id is not None:
            return f"{self.id} ({span})" if span else self.id
        return span


class FeatureDrift(_Frozen):
    """One drifted feature: the test, its statistic against the threshold, and both windows.

    ``reference`` / ``current``: short summaries of the values (``summarize()``
    formats one, e.g. ``mean 3.1 · std 1.2 · n 50000``).
    """

    feature: str
    test: str
    statistic: float
    threshold: float
    reference: str = ""
    current: str = ""


class Finding(_Frozen):
    """What one monitor found in one window.

    ``key`` names the finding stably across windows (``data_drift``,
    ``concept:auc``, ``popularity_head``): dedup and cooldown use it.
    """

    monitor: str = Field(min_length=1)
    window: Window
    key: str = Field(min_length=1)
    severity: Severity = "warning"
    title: str
    features: tuple[FeatureDrift, ...] = ()
    detail: str | None = None


class Alert(_Frozen):
    """The findings of one monitor run (one monitor, one window), and its report."""

    monitor: str = Field(min_length=1)
    window: Window
    findings: tuple[Finding, ...] = ()
    # The run's Evidently HTML report, a local path or a URI.
    report_path: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Alert:
        for finding in self.findings:
            if finding.monitor != self.monitor or finding.window.key != self.window.key:
                raise ValueError(
                    f"finding {finding.key!r} is for {finding.monitor}/{finding.window.key}, "
                    f"the alert for {self.monitor}/{self.window.key}"
                )
        keys = [f.key for f in self.findings]
        if len(set(keys)) != len(keys):
            raise ValueError(f"finding keys repeat within one alert: {keys}")
        return self


class DeliveryReport(_Frozen):
    """What :meth:`AlertSender.send` did with each finding of an alert, by finding key."""

    monitor: str
    window: str
    sent: tuple[str, ...] = ()
    suppressed_duplicate: tuple[str, ...] = ()
    suppressed_cooldown: tuple[str, ...] = ()
    dead_lettered: tuple[str, ...] = ()
    message_ids: tuple[str, ...] = ()
    # Why delivery failed (password masked), when something was dead-lettered.
    error: str | None = None
    # monitoring.alerts.enabled is false: nothing was decided or recorded.
    disabled: bool = False

    @property
    def ok(self) -> bool:
        """Nothing is waiting in the dead letter."""
        return not self.dead_lettered


class RenderedAlert(_Frozen):
    subject: str
    text: str
    html: str


# --------------------------------------------------------------------------- rendering


def summarize(**stats: float | int | str | None) -> str:
    """``mean 3.142 · std 1.2 · n 50000`` (numbers to 4 significant digits; None skipped)."""
    return " · ".join(f"{name} {_fmt(value)}" for name, value in stats.items() if value is not None)


def render_alert(
    alert: Alert,
    findings: Sequence[Finding] | None = None,
    *,
    link: str | None = None,
    cooldown_hours: float | None = None,
) -> RenderedAlert:
    """Subject, plain text and HTML of ``findings`` (default: all of the alert's).

    ``link``: where the full report is (a URL, or a local path shown as text).
    Every value from the findings is escaped.
    """
    shown = tuple(alert.findings if findings is None else findings)
    return RenderedAlert(
        subject=_subject(alert, shown),
        text=_text(alert, shown, link, cooldown_hours),
        html=_html(alert, shown, link, cooldown_hours),
    )


def _subject(alert: Alert, findings: Sequence[Finding]) -> str:
    worst = max((f.severity for f in findings), key=_SEVERITY_RANK.__getitem__, default="info")
    n = len(findings)
    return one_line(
        f"[rayrec {worst}] {alert.monitor}: {n} finding{'s' if n != 1 else ''}, "
        f"window {alert.window.label}"
    )


_COLUMNS = ("feature", "test", "statistic", "threshold", "reference", "current")


def _rows(finding: Finding) -> list[tuple[str, ...]]:
    return [
        (d.feature, d.test, _fmt(d.statistic), _fmt(d.threshold), d.reference, d.current)
        for d in finding.features
    ]


def _text(
    alert: Alert, findings: Sequence[Finding], link: str | None, cooldown_hours: float | None
) -> str:
    lines = [
        f"Drift alert from monitor {alert.monitor}",
        f"Window: {alert.window.label}",
        f"Findings: {len(findings)}",
        "",
    ]
    for finding in findings:
        lines.append(f"[{finding.severity.upper()}] {finding.title}  (finding: {finding.key})")
        if finding.detail:
            lines.append(finding.detail)
        rows = _rows(finding)
        if rows:
            table = [_COLUMNS, *rows]
            widths = [max(len(row[i]) for row in table) for i in range(len(_COLUMNS))]
            for row in table:
                cells = (c.ljust(w) for c, w in zip(row, widths, strict=True))
                lines.append(("  " + "  ".join(cells)).rstrip())
        lines.append("")
    lines.append(f"Full report: {link}" if link else "No report file was written for this run.")
    lines.append("")
    lines.append(_footer(cooldown_hours))
    return "\n".join(lines) + "\n"


_TD = 'style="padding:6px 10px;border-bottom:1px solid #d0d7de;{extra}"'


def _cell(value: str, *, tag: str = "td", numeric: bool = False, extra: str = "") -> str:
    align = "text-align:right;font-variant-numeric:tabular-nums;" if numeric else "text-align:left;"
    style = _TD.format(extra=align + extra)
    return f"<{tag} {style}>{html.escape(value)}</{tag}>"


def _html(
    alert: Alert, findings: Sequence[Finding], link: str | None, cooldown_hours: float | None
) -> str:
    e = html.escape
    n = len(findings)
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"></head>',
        '<body style="font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;'
        'color:#1f2328;max-width:900px;">',
        f'<h2 style="margin:0 0 4px;">Drift alert: {e(alert.monitor)}</h2>',
        f'<p style="margin:0 0 16px;color:#57606a;">Window {e(alert.window.label)} · '
        f"{n} finding{'s' if n != 1 else ''}</p>",
    ]
    for finding in findings:
        colour = _SEVERITY_COLOUR[finding.severity]
        parts.append(
            f'<h3 style="margin:20px 0 6px;"><span style="color:{colour};">'
            f"{e(finding.severity.upper())}</span> {e(finding.title)}</h3>"
        )
        if finding.detail:
            parts.append(f'<p style="margin:0 0 8px;">{e(finding.detail)}</p>')
        rows = _rows(finding)
        if rows:
            numeric = (False, False, True, True, False, False)
            head = "".join(
                _cell(c.capitalize(), tag="th", numeric=num, extra="background:#f6f8fa;")
                for c, num in zip(_COLUMNS, numeric, strict=True)
            )
            body = "".join(
                "<tr>"
                + "".join(_cell(c, numeric=num) for c, num in zip(row, numeric, strict=True))
                + "</tr>"
                for row in rows
            )
            parts.append(
                '<table style="border-collapse:collapse;font-size:14px;">'
                f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            )
        parts.append(
            f'<p style="margin:4px 0 0;color:#57606a;font-size:12px;">finding: '
            f"<code>{e(finding.key)}</code></p>"
        )
    if link and link.startswith(("http://", "https://")):
        parts.append(f'<p>Full report: <a href="{e(link, quote=True)}">{e(link)}</a></p>')
    elif link:
        parts.append(f"<p>Full report: <code>{e(link)}</code></p>")
    parts.append(f'<p style="color:#57606a;font-size:12px;">{e(_footer(cooldown_hours))}</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _footer(cooldown_hours: float | None) -> str:
    text = "Sent by rayrec monitoring."
    if cooldown_hours:
        text += f" The same finding is not mailed again within {_fmt(cooldown_hours)} h."
    return text


def _fmt(value: float | int | str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


# --------------------------------------------------------------------------- sender


class AlertSender:
    """Sends alerts once, as ``config`` says, keeping its ledger under ``<workdir>/monitoring/``.

    ``tls_context``: the context for STARTTLS/SSL (default: system CAs, hostname
    checked). ``clock``: the current UTC time (tests).
    """

    def __init__(
        self,
        config: AlertConfig,
        workdir: str | os.PathLike[str],
        *,
        tls_context: ssl.SSLContext | None = None,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.config = config
        self.workdir = StoragePath.from_uri(workdir)
        state = self.workdir.join("monitoring")
        self.ledger_path = state.join("alert_ledger.jsonl")
        self.dead_letter_path = (
            StoragePath.from_uri(config.dead_letter)
            if config.dead_letter
            else state.join("dead_letter.jsonl")
        )
        self._transport = SmtpTransport(
            config.smtp,
            attempts=config.attempts,
            backoff_s=config.backoff_s,
            tls_context=tls_context,
        )
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._lock = FileLock(_lock_file(self.workdir))

    # ---------------------------------------------------------------- public

    def send(self, alert: Alert) -> DeliveryReport:
        """Mail the alert's new findings once; see the module docstring for the rules.

        Raises :class:`AlertDeliveryError` when the e-mail was dead-lettered and
        ``on_smtp_failure`` is ``fail``.
        """
        report = self._send(alert, dead_letter=True)
        if report.dead_lettered and self.config.on_smtp_failure == "fail":
            raise AlertDeliveryError(
                f"alert of monitor {alert.monitor!r} for window {alert.window.key} not delivered: "
                f"{report.error}; written to {self.dead_letter_path.uri}"
            )
        return report

    def resend_dead_letters(self) -> list[DeliveryReport]:
        """Try every dead-lettered alert again (dedup and cooldown apply as in :meth:`send`).

        Delivered (or since then superseded) entries leave the file; the rest
        stay. Never raises for delivery failures: look at the reports.
        """
        reports: list[DeliveryReport] = []
        with self._lock:
            kept: list[dict[str, Any]] = []
            for entry in _read_jsonl(self.dead_letter_path):
                try:
                    alert = Alert.model_validate(entry["alert"])
                except (KeyError, ValidationError) as exc:
                    log.warning("dead_letter_unreadable", error=str(exc)[:200])
                    kept.append(entry)
                    continue
                report = self._send(alert, dead_letter=False, locked=True)
                reports.append(report)
                if report.dead_lettered:
                    kept.append(entry)
            if reports:
                _write_jsonl(self.dead_letter_path, kept)
        return reports

    # ---------------------------------------------------------------- internals

    def _send(self, alert: Alert, *, dead_letter: bool, locked: bool = False) -> DeliveryReport:
        base = {"monitor": alert.monitor, "window": alert.window.key}
        if not self.config.enabled:
            log.info("alerts_disabled", **base, findings=[f.key for f in alert.findings])
            return DeliveryReport(**base, disabled=True)
        if not alert.findings:
            return DeliveryReport(**base)
        if locked:
            return self._decide_and_send(alert, dead_letter=dead_letter)
        with self._lock:
            return self._decide_and_send(alert, dead_letter=dead_letter)

    def _decide_and_send(self, alert: Alert, *, dead_letter: bool) -> DeliveryReport:
        now = self._clock()
        records = _read_jsonl(self.ledger_path)
        to_send, duplicate, cooldown = self._triage(alert, records, now)
        base = {"monitor": alert.monitor, "window": alert.window.key}
        recorded = {
            (r.get("monitor"), r.get("window"), r.get("finding"))
            for r in records
            if r.get("status") == "suppressed_cooldown"
        }
        new_records = [
            self._record(alert, f, "suppressed_cooldown", now)
            for f in cooldown
            if (alert.monitor, alert.window.key, f.key) not in recorded
        ]
        if cooldown or duplicate:
            log.info(
                "alert_findings_suppressed",
                **base,
                duplicate=_keys(duplicate),
                cooldown=_keys(cooldown),
            )
        if not to_send:
            _append_jsonl(self.ledger_path, new_records)
            return DeliveryReport(
                **base, suppressed_duplicate=_keys(duplicate), suppressed_cooldown=_keys(cooldown)
            )

        link = self._report_link(alert.report_path)
        rendered = render_alert(
            alert, to_send, link=link, cooldown_hours=self.config.cooldown_hours
        )
        error: str | None = None
        message_id: str | None = None
        try:
            if not self.config.smtp.recipients:
                error = "monitoring.alerts.smtp.recipients is empty: nobody to mail"
            else:
                msg = build_message(
                    self.config.smtp,
                    rendered.subject,
                    rendered.text,
                    rendered.html,
                    self._attachment(alert.report_path),
                )
                self._transport.send(msg)
                message_id = str(msg["Message-ID"])
        except SmtpFailure as failure:
            error = f"{failure.reason} (after {failure.attempts} attempt(s))"
        except Exception as exc:  # a bug: keep the alert, then fail loudly
            if dead_letter:
                self._dead_letter(alert, to_send, rendered, self._transport.describe(exc), now)
            raise

        if error is not None:
            _append_jsonl(self.ledger_path, new_records)
            if dead_letter:
                self._dead_letter(alert, to_send, rendered, error, now)
            log.warning(
                "alert_not_delivered",
                **base,
                findings=_keys(to_send),
                error=error,
                dead_letter=self.dead_letter_path.uri if dead_letter else None,
            )
            return DeliveryReport(
                **base,
                suppressed_duplicate=_keys(duplicate),
                suppressed_cooldown=_keys(cooldown),
                dead_lettered=_keys(to_send),
                error=error,
            )

        new_records += [self._record(alert, f, "sent", now, message_id) for f in to_send]
        _append_jsonl(self.ledger_path, new_records)
        log.info(
            "alert_sent",
            **base,
            findings=_keys(to_send),
            recipients=len(self.config.smtp.recipients),
            message_id=message_id,
        )
        return DeliveryReport(
            **base,
            sent=_keys(to_send),
            suppressed_duplicate=_keys(duplicate),
            suppressed_cooldown=_keys(cooldown),
            message_ids=(message_id,) if message_id else (),
        )

    def _triage(
        self, alert: Alert, records: list[dict[str, Any]], now: dt.datetime
    ) -> tuple[list[Finding], list[Finding], list[Finding]]:
        """Split the findings into (to send, already sent for this window, in cooldown)."""
        sent: dict[str, list[dict[str, Any]]] = {}
        seen: dict[str, list[dict[str, Any]]] = {}
        # last_seen: a suppressed occurrence also extends the cooldown (config comment).
        counted = ("sent", "suppressed_cooldown")
        if self.config.cooldown_from == "last_sent":
            counted = ("sent",)
        for rec in records:
            if rec.get("monitor") != alert.monitor:
                continue
            if rec.get("status") == "sent":
                sent.setdefault(rec["finding"], []).append(rec)
            if rec.get("status") in counted:
                seen.setdefault(self._cooldown_key(rec["finding"]), []).append(rec)
        to_send: list[Finding] = []
        duplicate: list[Finding] = []
        cooldown: list[Finding] = []
        for finding in alert.findings:
            earlier = sent.get(finding.key, [])
            if any(rec["window"] == alert.window.key for rec in earlier):
                duplicate.append(finding)
            elif any(
                self._in_cooldown(alert.window, rec, now)
                for rec in seen.get(self._cooldown_key(finding.key), [])
            ):
                cooldown.append(finding)
            else:
                to_send.append(finding)
        return to_send, duplicate, cooldown

    def _cooldown_key(self, finding: str) -> str:
        """What a finding's cooldown is kept under: itself, or the whole monitor."""
        return _ANY if self.config.cooldown_scope == "monitor" else finding

    def _in_cooldown(self, window: Window, sent: dict[str, Any], now: dt.datetime) -> bool:
        """Within ``cooldown_hours`` of an earlier send: by window ends, else by wall clock."""
        hours = self.config.cooldown_hours
        if hours <= 0:
            return False
        if window.end is not None and sent.get("window_end"):
            gap = abs(window.end - dt.datetime.fromisoformat(sent["window_end"]))
        else:
            gap = now - dt.datetime.fromisoformat(sent["at"])
        return gap <= dt.timedelta(hours=hours)

    @staticmethod
    def _record(
        alert: Alert,
        finding: Finding,
        status: str,
        now: dt.datetime,
        message_id: str | None = None,
    ) -> dict[str, Any]:
        return {
            "monitor": alert.monitor,
            "window": alert.window.key,
            "window_end": alert.window.end.isoformat() if alert.window.end else None,
            "finding": finding.key,
            "status": status,
            "at": now.isoformat(),
            "message_id": message_id,
        }

    def _dead_letter(
        self,
        alert: Alert,
        findings: Sequence[Finding],
        rendered: RenderedAlert,
        error: str,
        now: dt.datetime,
    ) -> None:
        smtp = self.config.smtp
        entry = {
            "at": now.isoformat(),
            "monitor": alert.monitor,
            "window": alert.window.key,
            "findings": list(_keys(findings)),
            "error": error,
            "smtp": {"host": smtp.host, "port": smtp.port, "security": smtp.security},
            "sender": smtp.sender,
            "recipients": list(smtp.recipients),
            "subject": rendered.subject,
            "text": rendered.text,
            "html": rendered.html,
            # Only the findings that were to be mailed, so a resend mails the same ones.
            "alert": alert.model_copy(update={"findings": tuple(findings)}).model_dump(mode="json"),
        }
        _append_jsonl(self.dead_letter_path, [entry])

    def _report_link(self, report_path: str | None) -> str | None:
        """``report_base_url`` + the report's path below the workdir, or the report's own path."""
        if not report_path:
            return None
        report = StoragePath.from_uri(report_path)
        base = self.config.report_base_url
        if not base:
            return report.uri
        prefix = self.workdir.path.rstrip("/") + "/"
        relative = (
            report.path.removeprefix(prefix) if report.path.startswith(prefix) else report.name
        )
        return f"{base.rstrip('/')}/{quote(relative)}"

    def _attachment(self, report_path: str | None) -> Attachment | None:
        limit = self.config.max_attachment_kb * 1024
        if not report_path or limit <= 0:
            return None
        try:
            report = StoragePath.from_uri(report_path)
            size = report.fs.get_file_info(report.path).size
            if size is None or size > limit:
                return None
            return Attachment(filename=report.name, content=report.read_bytes())
        except OSError as exc:  # the link still says where it is
            log.warning("alert_attachment_unreadable", report=report_path, error=str(exc)[:200])
            return None


# --------------------------------------------------------------------------- files


# The ledger key under which cooldown_scope "monitor" gathers every finding's records.
_ANY = "*"


def _keys(findings: Iterable[Finding]) -> tuple[str, ...]:
    return tuple(f.key for f in findings)


def _lock_file(workdir: StoragePath) -> Path:
    if workdir.is_local:
        path = workdir.local_path() / "monitoring" / ".alerts.lock"
    else:
        key = hashlib.sha256(workdir.uri.encode()).hexdigest()[:16]
        path = Path.home() / ".cache" / "rayrec" / "locks" / f"{key}-alerts.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _read_jsonl(path: StoragePath) -> list[dict[str, Any]]:
    """Every whole line; a torn last line (a crash mid-append) is skipped with a warning."""
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("jsonl_line_unreadable", path=path.uri, line=number)
    return rows


def _append_jsonl(path: StoragePath, rows: Sequence[dict[str, Any]]) -> None:
    """Append (local: O_APPEND + fsync; object stores: rewrite in one PUT). Caller holds the lock."""
    if not rows:
        return
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    if path.is_local:
        target = path.local_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("ab+") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size > 0:  # after a torn last line (a crash mid-append), start a fresh one
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    text = "\n" + text
            handle.write(text.encode())
            handle.flush()
            os.fsync(handle.fileno())
    else:
        existing = path.read_text() if path.exists() else ""
        if existing and not existing.endswith("\n"):
            existing += "\n"
        path.write_text_atomic(existing + text)


def _write_jsonl(path: StoragePath, rows: Sequence[dict[str, Any]]) -> None:
    path.write_text_atomic("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
