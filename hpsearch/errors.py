"""Errors that reach users: each carries a message fit to print as it is, never a traceback."""

from __future__ import annotations


class HpsearchError(Exception):
    """Base of every error the CLI prints as one clear line and the API maps to a status."""


class SpecError(HpsearchError):
    """An invalid study spec: a list of (field path, reason)."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__(
            "; ".join(f"{path}: {reason}" if path else reason for path, reason in errors)
        )


class DatasetError(HpsearchError):
    """Data that cannot be loaded or trained on; the message names the column or file.
    `field` is the upload form field at fault ("file" or "target") for the API's 422."""

    def __init__(self, message: str, field: str = "file") -> None:
        super().__init__(message)
        self.field = field


class DatasetTooLarge(DatasetError):
    """Data that decodes to more values than the server accepts (HTTP 413)."""


class NotFound(HpsearchError):
    """No study, trial, dataset or token of that name or id (HTTP 404)."""


class Conflict(HpsearchError):
    """A name taken by something else, or a change the current state forbids (HTTP 409)."""
