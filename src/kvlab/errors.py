"""kvlab's exceptions.

Every error kvlab raises on purpose derives from :class:`KvlabError`, so the CLI can tell a
user's mistake (print one line, exit 2 or 1) from a bug (traceback). Messages name the value,
the rule it broke and the fix.
"""


class KvlabError(Exception):
    """Base class of the errors kvlab raises deliberately."""


class ConfigError(KvlabError, ValueError):
    """An impossible or unsupported model configuration or argument."""


class CacheOverflowError(KvlabError, RuntimeError):
    """Appending to a KV cache would go past its preallocated length."""


class CheckpointError(KvlabError, RuntimeError):
    """A checkpoint directory or file that cannot be read or written."""


class Interrupted(KvlabError):
    """Ctrl-C (SIGINT) during a run: the message says where it stopped; ``resumable`` whether a
    checkpoint exists to continue from (the CLI adds how, for the verbs that can)."""

    def __init__(self, message: str, *, resumable: bool = False):
        super().__init__(message)
        self.resumable = resumable


def require_positive_ints(obj: object, names: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` for the first of ``obj``'s attributes ``names`` that is not a
    positive integer (bools excluded) — the check every config dataclass starts with."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
