"""Errors that reach users: each carries a message fit to print as it is, never a traceback."""

from __future__ import annotations


class HpsearchError(Exception):
    """Base of every error the CLI prints as one clear line and the API maps to a status."""


class SpecError(HpsearchError):
    """An invalid study spec (or other input, `what`): a list of (field path, reason)."""

    def __init__(self, errors: list[tuple[str, str]], what: str = "study spec") -> None:
        self.errors = errors
        self.what = what
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


class ModelFileError(HpsearchError):
    """A model file hpsearch cannot use: not one at all, the bare weights that trials kept
    before model files existed, or a file from a newer hpsearch."""


class NotFound(HpsearchError):
    """No study, trial, dataset or token of that name or id (HTTP 404)."""


class Conflict(HpsearchError):
    """A name taken by something else, or a change the current state forbids (HTTP 409)."""


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) or SIGTERM reached the command line. A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` swallows it; its own class, so that
    Click does not turn it into "Aborted!" and exit code 1."""

    def __init__(self, signum: int = 2) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a command a signal ended."""
        return 128 + self.signum
