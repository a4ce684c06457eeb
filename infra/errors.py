"""Errors that the CLI turns into a one-line cause and a non-zero exit.

Every layer raises a subclass of :class:`RayrecError` for problems a user can
fix (bad config, bad input file, a lock held by another run); anything else is
a bug and keeps its traceback under ``--debug``.
"""

from __future__ import annotations


class RayrecError(Exception):
    """A problem the user can act on; its message is shown as one line."""

    exit_code: int = 2


class ConfigError(RayrecError):
    """The configuration names an unknown key or holds an invalid value."""


class DataValidationError(RayrecError):
    """Input data failed validation beyond the configured bad-row bound."""


class SourceError(RayrecError):
    """A data source could not be read: missing file, wrong layout, bad checksum."""


class PipelineLockedError(RayrecError):
    """Another run of the same pipeline holds the workdir lock."""


class StepFailedError(RayrecError):
    """A pipeline step raised; nothing it was writing got published."""
