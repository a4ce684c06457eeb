"""Drift alert e-mails sent to a real aiosmtpd server on 127.0.0.1, and read back."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword

from infra.config import AlertConfig, SmtpConfig
from monitoring.alerts import (
    Alert,
    AlertDeliveryError,
    AlertSender,
    FeatureDrift,
    Finding,
    Window,
    render_alert,
    send_test_email,
    summarize,
)

PASSWORD = "s3cret-hunter2-pw"
DAY = dt.timedelta(days=1)
T0 = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)


# --------------------------------------------------------------------------- server
# (free_port, smtp_server: tests/conftest.py)


def authenticating(server_logins: list[tuple[str, str]]) -> Callable[..., AuthResult]:
    def authenticator(
        server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        user, password = auth_data.login.decode(), auth_data.password.decode()
        server_logins.append((user, password))
        # handled=False: aiosmtpd itself answers a failure with 535.
        return AuthResult(success=user == "alerts" and password == PASSWORD, handled=False)

    return authenticator


def alert_config(port: int, **overrides: Any) -> AlertConfig:
    smtp = {
        "host": "127.0.0.1",
        "port": port,
        "recipients": ("oncall@example.com", "ml@example.com"),
        "sender": "rayrec@example.com",
        "timeout_s": 5.0,
        **overrides.pop("smtp", {}),
    }
    return AlertConfig.model_validate(
        {"smtp": SmtpConfig.model_validate(smtp), "backoff_s": 0.0, "attempts": 2, **overrides}
    )


# --------------------------------------------------------------------------- alerts


def window(day: int) -> Window:
    return Window(start=T0 + day * DAY, end=T0 + (day + 1) * DAY)


def data_drift(day: int, features: tuple[str, ...] = ("price", "age")) -> Finding:
    return Finding(
        monitor="data_drift",
        window=window(day),
        key="data_drift",
        severity="warning",
        title=f"{len(features)} of 20 features drifted",
        features=tuple(
            FeatureDrift(
                feature=name,
                test="wasserstein",
                statistic=0.4321 + i,
                threshold=0.1,
                reference=summarize(mean=3.0, std=1.0, n=50_000),
                current=summarize(mean=4.25, std=1.5, n=100_000),
            )
            for i, name in enumerate(features)
        ),
    )


def concept(day: int) -> Finding:
    return Finding(
        monitor="data_drift",
        window=window(day),
        key="concept:auc",
        severity="critical",
        title="AUC fell below its reference",
        detail="AUC 0.61 [0.59, 0.63] against 0.72 on the reference",
    )


def make_alert(day: int, *findings: Finding, report: Path | None = None) -> Alert:
    return Alert(
        monitor="data_drift",
        window=window(day),
        findings=findings,
        report_path=str(report) if report else None,
    )


def ledger(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "monitoring" / "alert_ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def html_part(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("html",))
    assert part is not None
    return part.get_content()


def text_part(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("plain",))
    assert part is not None
    return part.get_content()


# --------------------------------------------------------------------------- tests


def test_alert_arrives_with_table_link_and_small_attachment(
    smtp_server: Callable[..., Any], tmp_path: Path
) -> None:
    server = smtp_server()
    workdir = tmp_path / "workdir"
    report = workdir / "monitoring" / "reports" / "day 1" / "data_drift.html"
    report.parent.mkdir(parents=True)
    report.write_text("<html><body>evidently report</body></html>")
    config = alert_config(server.port, report_base_url="https://reports.example.com/rayrec/")
    sender = AlertSender(config, str(workdir))

    result = sender.send(make_alert(1, data_drift(1), concept(1), report=report))

    assert result.sent == ("data_drift", "concept:auc") and result.ok
    assert len(result.message_ids) == 1
    [envelope] = server.inbox.envelopes
    assert envelope.mail_from == "rayrec@example.com"
    assert envelope.rcpt_tos == ["oncall@example.com", "ml@example.com"]
    [msg] = server.inbox.messages
    assert msg["Message-ID"] == result.message_ids[0]
    subject = msg["Subject"]
    assert "data_drift" in subject and "2 findings" in subject and "2024-03-02" in subject
    assert "critical" in subject  # the worst severity leads
    html = html_part(msg)
    for expected in (
        "price",
        "age",
        "wasserstein",
        "0.4321",
        "1.432",
        "mean 3 · std 1",
        "mean 4.25",
    ):
        assert expected in html
    assert "AUC fell below its reference" in html and "0.59, 0.63" in html
    link = "https://reports.example.com/rayrec/monitoring/reports/day%201/data_drift.html"
    assert f'href="{link}"' in html
    text = text_part(msg)
    assert "price" in text and "0.4321" in text and link in text
    [attachment] = list(msg.iter_attachments())
    assert attachment.get_filename() == "data_drift.html"
    assert attachment.get_content() == report.read_text()
    assert [r["status"] for r in ledger(workdir)] == ["sent", "sent"]


def test_large_report_is_linked_by_path_not_attached(
    smtp_server: Callable[..., Any], tmp_path: Path
) -> None:
    server = smtp_server()
    report = tmp_path / "big.html"
    report.write_text("x" * 3000)
    sender = AlertSender(alert_config(server.port, max_attachment_kb=2), str(tmp_path / "w"))

    sender.send(make_alert(1, data_drift(1), report=report))

    [msg] = server.inbox.messages
    assert list(msg.iter_attachments()) == []
    assert str(report) in html_part(msg) and str(report) in text_part(msg)


def test_everything_in_the_body_is_escaped() -> None:
    finding = Finding(
        monitor="m<1>",
        window=Window(id="w&1"),
        key="k",
        title="<script>alert(1)</script>",
        features=(
            FeatureDrift(
                feature='<img src=x onerror="x">',
                test="ks",
                statistic=0.01,
                threshold=0.05,
                reference="a < b",
                current="c & d",
            ),
        ),
    )
    alert = Alert(monitor="m<1>", window=Window(id="w&1"), findings=(finding,))
    rendered = render_alert(alert, link='https://x.example/r?a=1&b="2"')
    assert "<script>" not in rendered.html and "&lt;script&gt;" in rendered.html
    assert (
        "<img" not in rendered.html and "&lt;img src=x onerror=&quot;x&quot;&gt;" in rendered.html
    )
    assert "a &lt; b" in rendered.html and "c &amp; d" in rendered.html
    assert "m&lt;1&gt;" in rendered.html and "w&amp;1" in rendered.html
    assert 'href="https://x.example/r?a=1&amp;b=&quot;2&quot;"' in rendered.html
    assert "\n" not in rendered.subject


def test_no_finding_sends_nothing(smtp_server: Callable[..., Any], tmp_path: Path) -> None:
    server = smtp_server()
    sender = AlertSender(alert_config(server.port), str(tmp_path))

    result = sender.send(make_alert(1))

    assert result.sent == () and result.ok
    assert server.inbox.envelopes == [] and ledger(tmp_path) == []


def test_disabled_alerts_send_nothing(smtp_server: Callable[..., Any], tmp_path: Path) -> None:
    server = smtp_server()
    sender = AlertSender(alert_config(server.port, enabled=False), str(tmp_path))

    result = sender.send(make_alert(1, data_drift(1)))

    assert result.disabled and result.sent == ()
    assert server.inbox.envelopes == [] and ledger(tmp_path) == []


def test_rerun_of_the_same_window_sends_no_duplicate(
    smtp_server: Callable[..., Any], tmp_path: Path
) -> None:
    server = smtp_server()
    config = alert_config(server.port)
    alert = make_alert(1, data_drift(1))

    first = AlertSender(config, str(tmp_path)).send(alert)
    again = AlertSender(config, str(tmp_path)).send(alert)  # a new process: the ledger persists

    assert first.sent == ("data_drift",)
    assert again.sent == () and again.suppressed_duplicate == ("data_drift",)
    assert len(server.inbox.envelopes) == 1
    assert [r["status"] for r in ledger(tmp_path)] == ["sent"]


def test_cooldown_suppresses_the_same_finding_in_the_next_window(
    smtp_server: Callable[..., Any], tmp_path: Path
) -> None:
    server = smtp_server()
    sender = AlertSender(
        alert_config(
            server.port, cooldown_hours=24, cooldown_from="last_sent", cooldown_scope="finding"
        ),
        str(tmp_path),
    )

    day1 = sender.send(make_alert(1, data_drift(1)))
    # Next day: the same drift is suppressed, a new finding still goes out, alone.
    day2 = sender.send(make_alert(2, data_drift(2), concept(2)))
    day2_rerun = sender.send(make_alert(2, data_drift(2)))
    # Two days after the last send of data_drift: mailed again.
    day3 = sender.send(make_alert(3, data_drift(3)))

    assert day1.sent == ("data_drift",)
    assert day2.sent == ("concept:auc",) and day2.suppressed_cooldown == ("data_drift",)
    assert day2_rerun.sent == () and day2_rerun.suppressed_cooldown == ("data_drift",)
    assert day3.sent == ("data_drift",)
    messages = server.inbox.messages
    assert len(messages) == 3
    assert "price" not in html_part(messages[1]) and "AUC fell" in html_part(messages[1])
    statuses = [(r["window"][:10], r["finding"], r["status"]) for r in ledger(tmp_path)]
    assert statuses == [
        ("2024-03-02", "data_drift", "sent"),
        ("2024-03-03", "data_drift", "suppressed_cooldown"),
        ("2024-03-03", "concept:auc", "sent"),
        ("2024-03-04", "data_drift", "sent"),
    ]


def test_findings_that_join_an_ongoing_incident_are_not_mailed_again(
    smtp_server: Callable[..., Any], tmp_path: Path
) -> None:
    """cooldown_scope monitor (the default): a drift that shows in the features on day 1
    and in the AUC on day 2 is one incident, one e-mail; after a clean cooldown the
    monitor mails again."""
    server = smtp_server()
    sender = AlertSender(alert_config(server.port, cooldown_hours=24), str(tmp_path))
    assert sender.send(make_alert(1, data_drift(1))).sent == ("data_drift",)
    day2 = sender.send(make_alert(2, data_drift(2), concept(2)))
    assert day2.sent == () and day2.suppressed_cooldown == ("data_drift", "concept:auc")
    day3 = sender.send(make_alert(3, concept(3)))
    assert day3.sent == () and day3.suppressed_cooldown == ("concept:auc",)
    # Day 4 clean, day 5 more than a cooldown after the last finding: a new incident.
    assert sender.send(make_alert(5, concept(5))).sent == ("concept:auc",)
    assert len(server.inbox.messages) == 2


def test_a_persisting_drift_is_mailed_once_until_it_has_been_gone_a_cooldown(
    smtp_server: Callable[..., Any], tmp_path: Path
) -> None:
    server = smtp_server()
    sender = AlertSender(alert_config(server.port, cooldown_hours=24), str(tmp_path))
    # The default, last_seen: days 1-3 drift (one e-mail), day 4 clean, day 6 drifts again.
    assert sender.send(make_alert(1, data_drift(1))).sent == ("data_drift",)
    assert sender.send(make_alert(2, data_drift(2))).suppressed_cooldown == ("data_drift",)
    assert sender.send(make_alert(3, data_drift(3))).suppressed_cooldown == ("data_drift",)
    assert sender.send(make_alert(6, data_drift(6))).sent == ("data_drift",)
    assert len(server.inbox.messages) == 2


def test_cooldown_of_id_only_windows_follows_the_wall_clock(
    smtp_server: Callable[..., Any], tmp_path: Path
) -> None:
    server = smtp_server()
    now = [T0]
    sender = AlertSender(
        alert_config(server.port, cooldown_hours=6, cooldown_from="last_sent"),
        str(tmp_path),
        clock=lambda: now[0],
    )

    def finding(window_id: str) -> Alert:
        w = Window(id=window_id)
        f = Finding(monitor="ann_health", window=w, key="recall", title="recall fell")
        return Alert(monitor="ann_health", window=w, findings=(f,))

    assert sender.send(finding("run-1")).sent == ("recall",)
    now[0] = T0 + dt.timedelta(hours=5)
    assert sender.send(finding("run-2")).suppressed_cooldown == ("recall",)
    now[0] = T0 + dt.timedelta(hours=7)
    assert sender.send(finding("run-3")).sent == ("recall",)
    assert len(server.inbox.envelopes) == 2


def test_smtp_down_dead_letters_without_secrets_and_fails(
    tmp_path: Path,
    smtp_server: Callable[..., Any],
    free_port: Callable[[], int],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()  # nothing listens here
    config = alert_config(port, smtp={"user": "alerts", "password": PASSWORD}, attempts=3)
    sender = AlertSender(config, str(tmp_path))

    with pytest.raises(AlertDeliveryError) as raised:
        sender.send(make_alert(1, data_drift(1), concept(1)))

    message = str(raised.value)
    assert "after 3 attempt(s)" in message and "dead_letter.jsonl" in message
    assert PASSWORD not in message and PASSWORD not in repr(raised.value)
    dead = tmp_path / "monitoring" / "dead_letter.jsonl"
    content = dead.read_text()
    assert PASSWORD not in content
    [entry] = [json.loads(line) for line in content.splitlines()]
    assert entry["findings"] == ["data_drift", "concept:auc"]
    assert "price" in entry["html"] and "data_drift" in entry["subject"]
    assert "Connection" in entry["error"]
    assert ledger(tmp_path) == []  # nothing recorded as sent
    captured = capsys.readouterr()
    assert PASSWORD not in captured.out + captured.err + caplog.text

    # The server comes back: the dead letter is delivered once and emptied.
    server = smtp_server(port, authenticator=authenticating([]), auth_require_tls=False)
    [resent] = sender.resend_dead_letters()
    assert resent.sent == ("data_drift", "concept:auc")
    assert len(server.inbox.envelopes) == 1 and dead.read_text() == ""
    assert sender.resend_dead_letters() == []
    assert sender.send(make_alert(1, data_drift(1))).suppressed_duplicate == ("data_drift",)


def test_smtp_down_warns_when_configured_to(tmp_path: Path, free_port: Callable[[], int]) -> None:
    config = alert_config(free_port(), on_smtp_failure="warn", attempts=1)
    dead = tmp_path / "elsewhere" / "dead.jsonl"
    config = config.model_copy(update={"dead_letter": str(dead)})
    sender = AlertSender(config, str(tmp_path / "w"))

    result = sender.send(make_alert(1, data_drift(1)))

    assert not result.ok and result.dead_lettered == ("data_drift",) and result.sent == ()
    assert result.error is not None and "127.0.0.1" in result.error
    assert len(dead.read_text().splitlines()) == 1


def test_login_with_user_and_password(smtp_server: Callable[..., Any], tmp_path: Path) -> None:
    logins: list[tuple[str, str]] = []
    server = smtp_server(authenticator=authenticating(logins), auth_require_tls=False)
    config = alert_config(server.port, smtp={"user": "alerts", "password": PASSWORD})

    result = AlertSender(config, str(tmp_path)).send(make_alert(1, data_drift(1)))

    assert result.sent == ("data_drift",)
    assert logins == [("alerts", PASSWORD)] and len(server.inbox.envelopes) == 1


def test_rejected_login_is_not_retried_and_never_leaks(
    smtp_server: Callable[..., Any], tmp_path: Path
) -> None:
    logins: list[tuple[str, str]] = []
    server = smtp_server(authenticator=authenticating(logins), auth_require_tls=False)
    wrong = "wrong-" + PASSWORD
    config = alert_config(
        server.port, smtp={"user": "alerts", "password": wrong}, attempts=3, on_smtp_failure="warn"
    )

    result = AlertSender(config, str(tmp_path)).send(make_alert(1, data_drift(1)))

    assert result.dead_lettered == ("data_drift",)
    # A 535 is permanent: one attempt (smtplib tries PLAIN, then LOGIN, on one connection).
    assert result.error is not None and "after 1 attempt(s)" in result.error
    assert len(logins) == 2 and "535" in result.error and wrong not in result.error
    assert wrong not in (tmp_path / "monitoring" / "dead_letter.jsonl").read_text()
    assert server.inbox.envelopes == []


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _server_tls(cert_key: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*cert_key)
    return context


def test_starttls_with_login(
    smtp_server: Callable[..., Any], tmp_path: Path, self_signed: tuple[Path, Path]
) -> None:
    logins: list[tuple[str, str]] = []
    server = smtp_server(
        tls_context=_server_tls(self_signed),
        require_starttls=True,
        authenticator=authenticating(logins),
    )  # auth over TLS only (aiosmtpd's default)
    config = alert_config(
        server.port, smtp={"security": "starttls", "user": "alerts", "password": PASSWORD}
    )
    trusted = ssl.create_default_context(cafile=str(self_signed[0]))

    result = AlertSender(config, str(tmp_path), tls_context=trusted).send(
        make_alert(1, data_drift(1))
    )

    assert result.sent == ("data_drift",) and logins == [("alerts", PASSWORD)]
    assert len(server.inbox.envelopes) == 1


def test_untrusted_certificate_fails_without_retry(
    smtp_server: Callable[..., Any], tmp_path: Path, self_signed: tuple[Path, Path]
) -> None:
    server = smtp_server(tls_context=_server_tls(self_signed), require_starttls=True)
    config = alert_config(server.port, smtp={"security": "starttls"}, on_smtp_failure="warn")

    result = AlertSender(config, str(tmp_path)).send(make_alert(1, data_drift(1)))

    assert result.dead_lettered == ("data_drift",)
    assert result.error is not None and "CERTIFICATE_VERIFY_FAILED" in result.error
    assert "after 1 attempt(s)" in result.error and server.inbox.envelopes == []


def test_implicit_tls(
    smtp_server: Callable[..., Any], tmp_path: Path, self_signed: tuple[Path, Path]
) -> None:
    server = smtp_server(ssl_context=_server_tls(self_signed))
    config = alert_config(server.port, smtp={"security": "ssl"})
    trusted = ssl.create_default_context(cafile=str(self_signed[0]))

    result = AlertSender(config, str(tmp_path), tls_context=trusted).send(
        make_alert(1, data_drift(1))
    )

    assert result.sent == ("data_drift",) and len(server.inbox.envelopes) == 1


def test_test_email(smtp_server: Callable[..., Any], free_port: Callable[[], int]) -> None:
    logins: list[tuple[str, str]] = []
    server = smtp_server(authenticator=authenticating(logins), auth_require_tls=False)
    config = alert_config(server.port, smtp={"user": "alerts", "password": PASSWORD})

    message_id = send_test_email(config)

    [msg] = server.inbox.messages
    assert msg["Message-ID"] == message_id and "test e-mail" in msg["Subject"]
    assert PASSWORD not in msg.as_string()

    down = alert_config(free_port(), smtp={"user": "alerts", "password": PASSWORD})
    with pytest.raises(AlertDeliveryError) as raised:
        send_test_email(down)
    assert PASSWORD not in str(raised.value)


def test_no_recipients_keeps_the_alert_in_the_dead_letter(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    config = alert_config(free_port(), smtp={"recipients": ()}, on_smtp_failure="warn")

    result = AlertSender(config, str(tmp_path)).send(make_alert(1, data_drift(1)))

    assert result.dead_lettered == ("data_drift",) and "recipients" in (result.error or "")
    assert (tmp_path / "monitoring" / "dead_letter.jsonl").exists()


def test_cli_test_email_arrives(smtp_server: Callable[..., Any], tmp_path: Path) -> None:
    from pipelines.cli import main

    server = smtp_server()
    args = [
        "monitor",
        "test-email",
        "--preset",
        "tiny",
        "--set",
        f"paths.workdir={tmp_path}",
        "--set",
        f"monitoring.alerts.smtp.port={server.port}",
        "--set",
        'monitoring.alerts.smtp.recipients=["ops@example.com"]',
    ]
    assert main(args) == 0
    assert [e.rcpt_tos for e in server.inbox.envelopes] == [["ops@example.com"]]
    # No recipients configured: one line, exit 1, nothing sent.
    assert main(args[:-2]) == 1
    assert len(server.inbox.envelopes) == 1
