"""The errors a user can cause, in one module that imports nothing else of outlierlab.

Any of them ends a run with one line on stderr and exit code 2 (runner.run). Recipes, the library and tests import
them from here, so raising a config error never needs the runner.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value is wrong (unknown choice, out of range, inconsistent with the model)."""


class SourceError(ValueError):
    """The model source cannot be resolved (missing file or package, unreachable hub)."""


class DataError(ValueError):
    """An evaluation or calibration corpus is missing or unreadable."""


class UnsupportedArchitecture(ValueError):
    """The model's architecture has no entry in the site table (models/sites.py)."""


USER_ERRORS = (ConfigError, SourceError, DataError, UnsupportedArchitecture)
