"""User-facing errors. Each says what was wrong, where (file, line, key) and what to do.

Entry points catch :class:`SphanaError` and print its message without a traceback.
"""

from __future__ import annotations


class SphanaError(Exception):
    """Base class of every error caused by input, configuration or a failed gate."""


class ConfigError(SphanaError):
    """A params key is unknown, mistyped or out of range."""


class InputError(SphanaError):
    """A bad input file; carries the file and, where known, the line."""

    def __init__(self, path: object, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.reason = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ParityError(SphanaError):
    """An exported model drifted from the PyTorch model beyond the configured tolerance."""


class VerifyError(SphanaError):
    """A manifest does not match the files it describes."""


class GateError(SphanaError):
    """A trained model scored below its component's metric_threshold."""
