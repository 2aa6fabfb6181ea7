"""Quantization config files (``--quant-config``): stage settings in TOML or YAML.

A config file sets any field of the three stages' settings::

    w_bits = 4            # top-level bit-widths belong to calibrate
    a_bits = 4
    calib_split = "val"   # top-level: every stage's images (here the published protocol)

    [calibrate]
    calib_images = 1
    eq_n = 128

    [mlp_recon]
    iters = 20000

    [reconstruct]
    loss = "aph"
    images = 256

YAML files use the same keys (``calibrate: {eq_n: 128}``). Users of the
original project can also write its flat option names (``w_bit``, ``a_bit``,
``calib_size``, ``optim_size``, ``optim_metric``, ...): :data:`LEGACY_KEYS`
maps each to the setting it means, and options that name behaviour this tool
has no alternative for (``optim_mode = "qdrop"``) are checked, not ignored.

A config is a layer between the model config's ``aphq_defaults`` and the
command line: single options given on the command line still win. Named
presets ship in ``aphq_cli/presets``; ``--quant-config 4bit`` is the published
4-bit configuration (method.md §8).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml

from aphq_cli.errors import AphqError

PRESETS_DIR = Path(__file__).parent / "presets"
SECTIONS = ("calibrate", "mlp_recon", "reconstruct")
TOP_LEVEL = {"w_bits": "calibrate", "a_bits": "calibrate"}
# Top-level keys that set the same field of every stage: one image protocol per pipeline.
EVERY_STAGE = ("calib_split",)

# The original project's option names -> (section, field). optim_size sets the
# number of images of both reconstructions, as it does there.
LEGACY_KEYS: dict[str, list[tuple[str, str]]] = {
    "w_bit": [("calibrate", "w_bits")],
    "a_bit": [("calibrate", "a_bits")],
    "calib_size": [("calibrate", "calib_images")],
    "eq_n": [("calibrate", "eq_n")],
    "search_round": [("calibrate", "search_round")],
    "pct": [("calibrate", "pct")],
    "optim_size": [("mlp_recon", "images"), ("reconstruct", "images")],
    "drop_prob": [("reconstruct", "drop_prob")],
    "quant_ratio": [("reconstruct", "quant_ratio")],
}
# optim_metric names the reconstruction loss there.
LEGACY_LOSSES = {"hessian_perturb": "aph", "mse": "mse", "fisher_diag": "fisher"}
# Options whose only supported value is the method's: anything else is refused
# rather than silently run as something the user did not ask for.
LEGACY_FIXED: dict[str, Any] = {
    "calib_metric": "mse",
    "matmul_head_channel_wise": True,
    "optim_mode": "qdrop",
    "reconstruct_mlp": True,
}


def presets() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def find_config(ref: str | Path) -> Path:
    """The file ``ref`` names: an existing path, or a preset name."""
    path = Path(ref)
    if path.is_file():
        return path
    if str(ref) in presets():
        return PRESETS_DIR / f"{ref}.toml"
    hint = f" (presets: {', '.join(presets())})" if presets() else ""
    raise AphqError(f"quant config {ref} is neither a file nor a preset{hint}")


def _parse(path: Path) -> dict:
    text = path.read_bytes()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix.lower() == ".toml":
            data = tomllib.loads(text.decode("utf-8"))
        else:
            raise AphqError(f"quant config {path} must end in .toml, .yaml or .yml")
    except AphqError:
        raise
    except Exception as exc:  # tomllib/yaml/unicode errors: say where, in one line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AphqError(f"quant config {path} cannot be parsed: {first}") from exc
    if not isinstance(data, dict):
        raise AphqError(f"quant config {path} must hold a table of settings, not {type(data).__name__}")
    return data


def sections_of(data: dict, source: str) -> dict[str, dict[str, Any]]:
    """Sort a parsed config's keys into per-stage settings (legacy names translated).

    Raises:
        AphqError: naming the first key that is not a stage setting.
    """
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in data.items():
        if key in SECTIONS or key.replace("-", "_") in SECTIONS:
            if not isinstance(value, dict):
                raise AphqError(f"quant config {source}: [{key}] must be a table of settings")
            out[key.replace("-", "_")].update(value)
        elif key in TOP_LEVEL:
            out[TOP_LEVEL[key]][key] = value
        elif key in EVERY_STAGE:
            for section in SECTIONS:
                out[section][key] = value
        elif key in LEGACY_KEYS:
            for section, name in LEGACY_KEYS[key]:
                out[section][name] = value
        elif key == "optim_metric":
            if value not in LEGACY_LOSSES:
                raise AphqError(f"quant config {source}: optim_metric {value!r} is not one of "
                                f"{', '.join(LEGACY_LOSSES)}")
            out["reconstruct"]["loss"] = LEGACY_LOSSES[value]
        elif key in LEGACY_FIXED:
            if value != LEGACY_FIXED[key]:
                raise AphqError(f"quant config {source}: {key} = {value!r} is not supported; "
                                f"this tool implements {key} = {LEGACY_FIXED[key]!r} only")
        else:
            raise AphqError(f"quant config {source}: unknown key {key!r} (expected "
                            f"{', '.join(SECTIONS + tuple(TOP_LEVEL) + EVERY_STAGE)} or the original project's names)")
    return out


def load_quant_config(ref: str | Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """Read a config file or preset.

    Returns:
        ``(description, sections)``: a description for artifact headers
        (``preset 4bit`` or the file's absolute path) and the settings per stage.
    """
    path = find_config(ref)
    label = f"preset {path.stem}" if path.parent == PRESETS_DIR else str(path.resolve())
    return label, sections_of(_parse(path), str(ref))


def stage_settings(ref: str | Path | None, stage: str) -> tuple[str, dict[str, Any]]:
    """The settings a config gives one stage (``mlp-recon`` or ``mlp_recon``); empty without a config."""
    if ref is None:
        return "", {}
    label, sections = load_quant_config(ref)
    return label, sections[stage.replace("-", "_")]
