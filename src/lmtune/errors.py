"""Errors a user can act on. The CLI prints them as one message and exits with code 2."""

from __future__ import annotations


class LmtuneError(Exception):
    """Something the user can fix. `fix` says how; the message names the key, file or record."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.fix}" if self.fix else self.message


class ConfigError(LmtuneError):
    """A YAML key or value, or a combination of them, that cannot work."""


class DataError(LmtuneError):
    """A dataset file or record that cannot be used. Names the file and record index when known."""

    def __init__(self, message: str, fix: str | None = None, *, file: str | None = None,
                 record: int | None = None):
        where = ""
        if file is not None:
            where = f"{file}"
            if record is not None:
                where += f", record {record}"
            where += ": "
        super().__init__(where + message, fix)
        self.file = file
        self.record = record


class ModelError(LmtuneError):
    """A model, tokenizer or adapter that cannot be loaded or used as asked."""


class TrainingError(LmtuneError):
    """A run that has to stop: non-finite loss, nothing to train on, a broken checkpoint."""


class RunInterrupted(LmtuneError):
    """Ctrl-C or SIGTERM: the run saved a checkpoint and stopped. Exits 130 like an interrupted tool."""

    exit_code = 130
