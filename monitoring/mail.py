"""SMTP transport for monitoring e-mails: connect as configured, retry, never leak the password.

:class:`SmtpTransport` sends one ``EmailMessage`` over plain SMTP, STARTTLS or
implicit TLS (``monitoring.alerts.smtp.security``), logs in when a user is set,
and retries transient failures (refused connection, timeout, 4xx replies) with
exponential backoff from ``backoff_s``. Permanent failures (5xx replies such as
a rejected login or recipient, an untrusted certificate, a missing server
extension) are not retried: another attempt cannot succeed. Every error it
reports has the password masked; ``smtplib`` debugging (which prints the AUTH
exchange) is never switched on.

The module is named ``mail`` rather than ``email`` so it never shadows the
standard library's ``email`` package.
"""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity import wait_exponential as _wait_exponential

from infra.config import AlertConfig, SmtpConfig
from infra.errors import ConfigError, RayrecError
from infra.logs import get_logger

log = get_logger(__name__)

# Longest error text kept in messages, logs and dead letters.
_MAX_ERROR_CHARS = 500


class AlertDeliveryError(RayrecError):
    """An e-mail was not delivered after every attempt (an alert went to the dead letter)."""


class SmtpFailure(Exception):
    """Delivery failed after ``attempts`` tries; ``reason`` is safe to log (password masked)."""

    def __init__(self, reason: str, attempts: int, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts
        self.permanent = permanent


@dataclass(frozen=True)
class Attachment:
    filename: str
    content: bytes
    maintype: str = "text"
    subtype: str = "html"


def build_message(
    smtp: SmtpConfig,
    subject: str,
    text: str,
    html: str | None = None,
    attachment: Attachment | None = None,
) -> EmailMessage:
    """A ``multipart/alternative`` text + HTML message (``multipart/mixed`` with an attachment)."""
    msg = EmailMessage()
    msg["Subject"] = one_line(subject)
    msg["From"] = smtp.sender
    msg["To"] = ", ".join(smtp.recipients)
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = make_msgid(domain=_domain(smtp.sender))
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation auto-replies
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    if attachment is not None:
        msg.add_attachment(
            attachment.content,
            maintype=attachment.maintype,
            subtype=attachment.subtype,
            filename=attachment.filename,
        )
    return msg


class SmtpTransport:
    """Sends messages as ``smtp`` says, ``attempts`` times at most.

    ``tls_context`` overrides the default context (system CAs, hostname check)
    for STARTTLS and SSL, e.g. to trust a private CA.
    """

    def __init__(
        self,
        smtp: SmtpConfig,
        *,
        attempts: int = 1,
        backoff_s: float = 0.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.smtp = smtp
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.tls_context = tls_context

    @property
    def endpoint(self) -> str:
        return f"{self.smtp.host}:{self.smtp.port} ({self.smtp.security})"

    def send(self, msg: EmailMessage) -> None:
        """Deliver ``msg`` to every configured recipient or raise :class:`SmtpFailure`."""
        if not self.smtp.recipients:
            raise ConfigError("monitoring.alerts.smtp.recipients is empty: nobody to mail")
        retrying = Retrying(
            stop=stop_after_attempt(self.attempts),
            wait=_wait_exponential(multiplier=self.backoff_s),
            retry=retry_if_exception(_is_transient),
            before_sleep=self._log_retry,
            reraise=True,
        )
        tries = 0
        try:
            for attempt in retrying:
                with attempt:
                    tries += 1
                    self._send_once(msg)
        except OSError as exc:  # smtplib.SMTPException and ssl.SSLError are OSErrors
            raise SmtpFailure(
                f"{self.endpoint}: {self.describe(exc)}", tries, not _is_transient(exc)
            ) from None

    def _send_once(self, msg: EmailMessage) -> None:
        cfg = self.smtp
        context = self.tls_context or ssl.create_default_context()
        client: smtplib.SMTP
        if cfg.security == "ssl":
            client = smtplib.SMTP_SSL(cfg.host, cfg.port, timeout=cfg.timeout_s, context=context)
        else:
            client = smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout_s)
        with client:
            if cfg.security == "starttls":
                client.starttls(context=context)
            if cfg.user:
                password = cfg.password.get_secret_value() if cfg.password is not None else ""
                client.login(cfg.user, password)
            refused = client.send_message(msg, from_addr=cfg.sender, to_addrs=list(cfg.recipients))
        if refused:  # some recipients took it: delivered, but say who did not
            log.warning(
                "smtp_recipients_refused",
                refused=sorted(refused),
                message_id=msg["Message-ID"],
            )

    def describe(self, exc: BaseException) -> str:
        """``Type: message`` with the password masked, bounded in length."""
        text = f"{type(exc).__name__}: {exc}"
        secret = self.smtp.password.get_secret_value() if self.smtp.password is not None else ""
        if secret:
            text = text.replace(secret, "**********")
        return text[:_MAX_ERROR_CHARS]

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning(
            "smtp_retry",
            endpoint=self.endpoint,
            attempt=state.attempt_number,
            of=self.attempts,
            wait_s=round(state.next_action.sleep, 3) if state.next_action else 0.0,
            error=self.describe(exc) if exc is not None else None,
        )


def send_test_email(config: AlertConfig, *, tls_context: ssl.SSLContext | None = None) -> str:
    """Mail a short test message with the configured SMTP settings; its Message-ID.

    For ``rayrec monitor test-email``: uses the same connection, login, retries
    and backoff as alerts but no ledger and no dead letter; raises
    :class:`AlertDeliveryError` (password masked) when it cannot be delivered.
    """
    smtp = config.smtp
    transport = SmtpTransport(
        smtp, attempts=config.attempts, backoff_s=config.backoff_s, tls_context=tls_context
    )
    text = (
        "This is a test e-mail from rayrec monitoring.\n\n"
        f"SMTP server: {transport.endpoint}\n"
        f"Login: {'as ' + smtp.user if smtp.user else 'none'}\n"
        f"Sender: {smtp.sender}\n"
        f"Recipients: {', '.join(smtp.recipients)}\n\n"
        "Drift alerts will arrive from the same sender.\n"
    )
    msg = build_message(smtp, "[rayrec] monitoring test e-mail", text)
    try:
        transport.send(msg)
    except SmtpFailure as failure:
        raise AlertDeliveryError(
            f"test e-mail not delivered after {failure.attempts} attempt(s): {failure.reason}"
        ) from None
    log.info("test_email_sent", endpoint=transport.endpoint, message_id=msg["Message-ID"])
    return str(msg["Message-ID"])


def one_line(text: str) -> str:
    """Header-safe: no CR/LF (header injection), runs of whitespace collapsed."""
    return " ".join(text.split())


def _domain(address: str) -> str | None:
    return address.rsplit("@", 1)[1].strip("> ") if "@" in address else None


def _is_transient(exc: BaseException) -> bool:
    """Worth another attempt: connection problems, timeouts, 4xx replies."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return any(code < 500 for code, _ in exc.recipients.values())
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return True
    if isinstance(exc, smtplib.SMTPResponseException):
        return exc.smtp_code < 500
    if isinstance(exc, smtplib.SMTPNotSupportedError | ssl.SSLCertVerificationError):
        return False
    if type(exc) is smtplib.SMTPException:  # e.g. "No suitable authentication method found."
        return False
    return isinstance(exc, OSError)
