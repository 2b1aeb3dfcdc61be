"""The errors a user can cause and fix, in one light module: the CLI catches them without
importing torch, and each says what was expected and what came."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message says which and why."""


class DataError(ValueError):
    """The input data cannot be used as given; the message says what is wrong and how to fix it."""


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded as asked; the message says what did not match."""


class StoreError(ValueError):
    """A model directory or version is missing, inconsistent or corrupt."""
