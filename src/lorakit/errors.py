"""lorakit's error types. Every error a user can provoke is a subclass of LorakitError."""


class LorakitError(Exception):
    """Base class of every error lorakit raises on bad input."""


class ConfigError(LorakitError, ValueError):
    """A configuration is malformed: unknown key, bad value, unknown method."""


class AdapterError(LorakitError, KeyError):
    """An adapter name is unknown, already taken, or unsafe."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class AdapterFileError(LorakitError, OSError):
    """An adapter directory is missing, truncated or does not match the model."""


class ModelNotAvailableError(LorakitError, OSError):
    """A model alias needs a package that is not installed (never downloaded at run time)."""
