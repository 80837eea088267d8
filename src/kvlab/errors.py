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
