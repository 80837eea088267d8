"""Recipe configs declare their settings once: a field's default, and the help its command-line
flag shows (read by :func:`kvlab.cli.common.config_option`), so a number is never written in the
verb and in the recipe both."""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any


def option(default: Any = MISSING, help: str | None = None) -> Any:
    """A config field with ``default`` (none: the setting is required) and its flag's ``help``."""
    return field(default=default, metadata={"help": help} if help else {})


def device_option() -> Any:
    """The device a recipe runs on (checked by the command line before any work)."""
    return option("cpu", "cpu (default), cuda, cuda:N or mps")
