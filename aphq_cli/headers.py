"""Typed records of what an artifact's ``aphq.config`` header holds: one schema, one reader, one writer.

:class:`StageRecord` is the header of a run's stage artifacts (mlp-recon,
calibrate, reconstruct) and of their parts (finished blocks and units);
:class:`ExportRecord` that of an export. ``from_dict`` checks every field's
type, so a header of valid JSON but the wrong structure is one sentence
naming the field, never a ``KeyError`` deep in a loader; ``to_dict`` writes
the same layout that older artifacts have, so they still read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aphq_cli.errors import AphqError

_NUMBER = (int, float)


def _check(path: Path, name: str, value: Any, kind, required: bool) -> None:
    if value is None:
        if required:
            raise AphqError(f"{path} has a malformed aphq header: it lacks {name!r}; rerun the stage that wrote it")
        return
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, _NUMBER))
    if ok and kind is list and name in ("image_ids", "losses", "relu_mlp_blocks"):
        item = {"image_ids": int, "losses": _NUMBER, "relu_mlp_blocks": str}[name]
        ok = all(isinstance(v, item) and not isinstance(v, bool) for v in value)
    if not ok:
        raise AphqError(f"{path} has a malformed aphq header: {name!r} is {type(value).__name__} {value!r:.60}; "
                        "rerun the stage that wrote it")


def _read(cls, data: Any, path: Path, required: tuple[str, ...], kinds: dict[str, Any]):
    if not isinstance(data, dict):
        raise AphqError(f"{path} has a malformed aphq header: its config is {type(data).__name__}, not a table; "
                        "rerun the stage that wrote it")
    names = {f.name for f in dataclasses.fields(cls)}
    for name in names:
        _check(path, name, data.get(name), kinds[name], name in required)
    # Keys of a newer aphq are kept, not dropped: to_dict writes back what was read.
    return cls(**{k: v for k, v in data.items() if k in names}, rest={k: v for k, v in data.items() if k not in names})


def _write(record) -> dict:
    out = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)
           if f.name != "rest" and getattr(record, f.name) is not None}
    return dict(record.rest) | out


@dataclass(frozen=True)
class StageRecord:
    """The header of a run's stage artifact, or of one of its finished parts.

    Attributes:
        model, checkpoint, data, image_ids, calib_split: what the stage started
            from (model name or config path, weights, COCO folder, its images and
            their protocol).
        mlp_recon, calibrate, reconstruct: each stage's resolved settings, as
            the stage that made this model wrote them (reconstruct carries over
            calibrate's).
        mlp_recon_artifact: the mlp-recon artifact the model was built on ("" for none).
        quant_config, reconstruct_quant_config: the ``--quant-config`` each used.
        quantization_map: every quantizer's bits (quantized stages).
        unit, block, losses, total_blocks: a finished part's name, its loss
            curve and how many parts the stage has.
        rest: keys this version does not know, kept as they are.
    """

    model: str | None = None
    checkpoint: str | None = None
    data: str | None = None
    image_ids: list | None = None
    calib_split: str | None = None
    mlp_recon: dict | None = None
    calibrate: dict | None = None
    reconstruct: dict | None = None
    mlp_recon_artifact: str | None = None
    quant_config: str | None = None
    reconstruct_quant_config: str | None = None
    quantization_map: dict | None = None
    unit: str | None = None
    block: str | None = None
    losses: list | None = None
    total_blocks: int | None = None
    rest: dict = dataclasses.field(default_factory=dict)

    _KINDS = {"model": str, "checkpoint": str, "data": str, "image_ids": list, "calib_split": str,
              "mlp_recon": dict, "calibrate": dict, "reconstruct": dict, "mlp_recon_artifact": str,
              "quant_config": str, "reconstruct_quant_config": str, "quantization_map": dict, "unit": str,
              "block": str, "losses": list, "total_blocks": int, "rest": dict}

    @classmethod
    def from_dict(cls, data: Any, path: Path, *, quantized: bool = False, provenance: bool = True) -> "StageRecord":
        """Check and read a header config.

        Args:
            quantized: the artifact holds a quantized model (calibrate,
                reconstruct): its calibrate settings, with integer bit-widths, are required.
            provenance: require what the model is rebuilt from (model,
                checkpoint, data, images); a reader of a part's loss curve
                alone (``aphq report``) needs none of it, only the right types.
        """
        required = ("model", "checkpoint", "data", "image_ids") if provenance else ()
        record = _read(cls, data, Path(path), required + (("calibrate",) if quantized else ()), cls._KINDS)
        if quantized:
            for name in ("w_bits", "a_bits"):
                _check(Path(path), f"calibrate.{name}", record.calibrate.get(name), int, True)
        return record

    def to_dict(self) -> dict:
        return _write(self)

    def with_fields(self, **changes) -> "StageRecord":
        return dataclasses.replace(self, **changes)

    @property
    def w_bits(self) -> int:
        return self.calibrate["w_bits"]

    @property
    def a_bits(self) -> int:
        return self.calibrate["a_bits"]

    @property
    def protocol(self) -> str:
        """Which images the pipeline used: ``train``, ``val``, or e.g. ``calibrate val, reconstruct train``.

        Headers written before the protocol was recorded used the training split.
        """
        used = {stage: settings.get("calib_split", "train") for stage, settings in
                (("mlp-recon", self.mlp_recon), ("calibrate", self.calibrate), ("reconstruct", self.reconstruct))
                if isinstance(settings, dict)}
        kinds = set(used.values()) or {self.calib_split or "train"}
        if len(kinds) == 1:
            return kinds.pop()
        return ", ".join(f"{stage} {kind}" for stage, kind in used.items())


@dataclass(frozen=True)
class ExportRecord:
    """The header of an export (``docs/export-format.md``)."""

    export_format: int | None = None
    model: str | None = None
    data: str | None = None
    source_stage: str | None = None
    calib_split: str | None = None
    w_bits: int | None = None
    a_bits: int | None = None
    relu_mlp_blocks: list | None = None
    quantization_map: dict | None = None
    mmdet_config: dict | None = None
    manifest: dict | None = None
    rest: dict = dataclasses.field(default_factory=dict)

    _KINDS = {"export_format": int, "model": str, "data": str, "source_stage": str, "calib_split": str,
              "w_bits": int, "a_bits": int, "relu_mlp_blocks": list, "quantization_map": dict,
              "mmdet_config": dict, "manifest": dict, "rest": dict}

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> "ExportRecord":
        return _read(cls, data, Path(path), ("export_format", "model", "data", "w_bits", "a_bits",
                                             "relu_mlp_blocks", "mmdet_config", "manifest"), cls._KINDS)

    def to_dict(self) -> dict:
        return _write(self)


QUANTIZED = ("calibrate", "reconstruct", "reconstruct-unit")  # stages whose artifacts hold a quantized model


def stage_record(header, path: Path, expect: str | None = None) -> StageRecord:
    """The typed record of a run artifact's header (an :class:`~aphq_cli.artifacts.ArtifactHeader`).

    Args:
        expect: the stage the file must hold (a run's ``calibrate.safetensors``
            holds calibrate); an export or another stage's artifact put under
            that name is refused with one sentence.
    """
    if expect is not None and header.stage != expect:
        raise AphqError(f"{path} holds an aphq {header.stage} artifact, not the {expect} stage's; "
                        f"move it away and rerun `aphq {expect}`")
    return StageRecord.from_dict(header.config, path, quantized=header.stage in QUANTIZED)
