"""Errors that are the user's to fix: the CLI prints them on one line and exits with code 2."""


class ObsfeedUserError(Exception):
    """Bad input or configuration: one line saying what and where."""


class ConfigError(ObsfeedUserError):
    """The run config is missing, malformed or has an unknown or invalid key."""


class InputError(ObsfeedUserError):
    """An input file is missing, unreadable, or lacks a required column."""


class SchemaError(InputError):
    """A table does not conform to its declared Arrow schema."""


class GateError(ObsfeedUserError):
    """A data-quality gate failed (too many bad rows, a failed expectation)."""


class LockError(ObsfeedUserError):
    """Another run holds the scheduled root (or left a stale lock behind)."""
