"""Stage settings: typed dataclasses filled from defaults, the model config and the command line.

Every value is checked against its field's type where it enters (a
``--quant-config`` file, a model config's ``aphq_defaults``, the command
line): ``eq_n = "abc"`` or ``reparam = "no"`` is one sentence naming the
setting, never a crash minutes later or a string taken as true.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, fields
from typing import Any, TypeVar, get_type_hints

from aphq_cli.errors import AphqError

T = TypeVar("T")

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def checked_value(cls: type, name: str, value: Any, stage: str) -> Any:
    """``value`` for field ``name`` of ``cls`` if it has the field's type (an integer counts as a number).

    Returns:
        The value; a number field gets a float, so ``lr = 1`` and ``lr = 1.0`` are one setting.

    Raises:
        AphqError: naming the setting, the type it needs and the value given.
    """
    want = _field_types(cls).get(name)
    if want not in _TYPE_NAMES:  # a field of another type checks itself in __post_init__
        return value
    if isinstance(value, bool):
        ok = want is bool
    elif want is float:
        ok = isinstance(value, (int, float)) and math.isfinite(value)
    else:
        ok = isinstance(value, want)
    if not ok:
        raise AphqError(f"{stage} setting {name} must be {_TYPE_NAMES[want]}, got {value!r}")
    return float(value) if want is float else value


def check_values(cls: type, values: dict, stage: str) -> dict:
    """``values`` with each checked against its field of ``cls`` (see :func:`checked_value`).

    Raises:
        AphqError: for a key ``cls`` has no field for (no silent defaults), or a value of the wrong type.
    """
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise AphqError(f"unknown {stage} setting(s): {', '.join(unknown)}")
    return {k: checked_value(cls, k, v, stage) for k, v in values.items()}


def settings_from_dict(cls: type[T], values: dict, stage: str) -> T:
    """``cls(**values)`` with every value checked first (:func:`check_values`); ranges check in ``cls``."""
    return cls(**check_values(cls, values, stage))


def with_arguments(settings: dict | None, **arguments) -> dict:
    """``settings`` with each keyword argument that was given (not None) on top.

    A stage takes a few settings as named arguments (``iters=``) and the rest
    as a dict; an argument left at None must not erase the dict's value.
    """
    return dict(settings or {}) | {k: v for k, v in arguments.items() if v is not None}


def resolve_settings(cls: type[T], cfg, stage: str, overrides: dict, file_values: dict | None = None) -> T:
    """Dataclass defaults, the model config's ``aphq_defaults[<stage>]``, a quant config, then overrides.

    Later layers win key by key; ``None`` overrides (options not given) are
    skipped. This is the one place a stage's settings object is made.

    Args:
        stage: the stage name (``mlp-recon``); its config key uses underscores.
        file_values: this stage's section of a ``--quant-config`` file.
    """
    values = dict(cfg.get("aphq_defaults", {}).get(stage.replace("-", "_"), {}))
    values.update(file_values or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return settings_from_dict(cls, values, stage)


# Field metadata of a setting added after artifacts were already being written: at its default it is
# left out of the record, so those artifacts' settings (and the cache key made from them) stay the same.
ADDED_LATER = {"added_later": True}


def settings_record(config) -> dict:
    """``asdict(config)`` without the :data:`ADDED_LATER` fields that are at their default.

    What a stage records in its header and keys its cache on: a run made
    before such a setting existed, and its rerun with the setting at its
    default, are the same settings.
    """
    record = asdict(config)
    for f in fields(config):
        if f.metadata.get("added_later") and record[f.name] == f.default:
            del record[f.name]
    return record
