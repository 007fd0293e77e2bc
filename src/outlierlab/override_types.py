"""Command-line values get the type of the key they replace: `seed=abc` stops before any weights load.

Hydra replaces a key's value with whatever the command line says, whatever its type. Each `key=value` override is
checked against the value the same key has in the configuration composed from the command's group choices alone
(model=, +exp=, eval=, ...), i.e. the default the user replaced. A null default accepts anything; an int accepts an
int, a float an int or a float, a bool a bool, a list a list, a mapping a mapping; a string default accepts
anything (such keys are often unions: `exp.massive_activations: registry` or a list of entries). Keys that
are new (+key=) or Hydra's own (hydra.*) are not checked.
"""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf

_MISSING = object()
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", list: "a list", dict: "a mapping"}


def _kind(value):
    if isinstance(value, (ListConfig, list, tuple)):
        return list
    if isinstance(value, (DictConfig, dict)):
        return dict
    return type(value)


def _accepts(default, value) -> bool:
    expected, given = _kind(default), _kind(value)
    # A string default is often one spelling of a union (exp.massive_activations: registry | [entries]).
    if default is None or value is None or expected is str:
        return True
    if expected is float:
        return given in (int, float)
    return given is expected


def _reference(conf_dir: Path, group_overrides: list[str]) -> DictConfig:
    if GlobalHydra.instance().is_initialized():  # inside @hydra.main: its own search path
        return compose("config", overrides=group_overrides)
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        return compose("config", overrides=group_overrides)


def check_override_types(overrides: list[str], conf_dir: Path) -> str | None:
    """The first override whose value does not fit its key's default, as one line; None if all fit."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    is_group = [(conf_dir / o.key_or_group).is_dir() or o.key_or_group.startswith("hydra") for o in parsed]
    groups = [text for text, group in zip(overrides, is_group) if group]
    values = [(text, o) for text, o, group in zip(overrides, parsed, is_group)
              if not group and not o.is_add() and not o.is_delete() and not o.is_sweep_override()]
    if not values:
        return None
    reference = _reference(conf_dir, groups)
    for text, override in values:
        # A default that cannot be resolved without the command's values (model=path's name from its source)
        # reads as None: anything fits.
        default = OmegaConf.select(reference, override.key_or_group, default=_MISSING, throw_on_missing=False,
                                   throw_on_resolution_failure=False)
        if default is _MISSING:
            continue  # a key the defaults do not have: Hydra itself reports it
        value = override.value()
        if not _accepts(default, value):
            wanted = _EXPECTED.get(_kind(default), type(default).__name__)
            return f"{text}: {override.key_or_group} must be {wanted} (its default is {default!r})"
    return None
