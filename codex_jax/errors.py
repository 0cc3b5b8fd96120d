"""Error types. Every user-facing failure is a ``CodexError``: the CLI prints its
one-line message and exits non-zero; nothing else is caught."""


class CodexError(Exception):
    """Base class of errors that the CLI reports as one line and exit code 2."""


class ConfigError(CodexError, ValueError):
    """An invalid configuration value; the message names the field and value."""


class DataError(CodexError, ValueError):
    """Bad input data; the message names the file, line and field."""
