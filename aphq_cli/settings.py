"""Stage settings: typed dataclasses filled from defaults, the model config and the command line."""

from __future__ import annotations

from dataclasses import fields
from typing import TypeVar

from aphq_cli.errors import AphqError

T = TypeVar("T")


def settings_from_dict(cls: type[T], values: dict, stage: str) -> T:
    """``cls(**values)``, refusing keys ``cls`` does not have (no silent defaults)."""
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise AphqError(f"unknown {stage} setting(s): {', '.join(unknown)}")
    return cls(**values)


def with_arguments(settings: dict | None, **arguments) -> dict:
    """``settings`` with each keyword argument that was given (not None) on top.

    A stage takes a few settings as named arguments (``iters=``) and the rest
    as a dict; an argument left at None must not erase the dict's value.
    """
    return dict(settings or {}) | {k: v for k, v in arguments.items() if v is not None}


def resolve_settings(cls: type[T], cfg, stage: str, overrides: dict, file_values: dict | None = None) -> T:
    """Dataclass defaults, the model config's ``aphq_defaults[<stage>]``, a quant config, then overrides.

    Later layers win key by key; ``None`` overrides (options not given) are skipped.

    Args:
        stage: the stage name (``mlp-recon``); its config key uses underscores.
        file_values: this stage's section of a ``--quant-config`` file.
    """
    values = dict(cfg.get("aphq_defaults", {}).get(stage.replace("-", "_"), {}))
    values.update(file_values or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return settings_from_dict(cls, values, stage)
