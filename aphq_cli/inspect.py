"""``aphq inspect`` and ``aphq status``: what an artifact holds and where a run stands."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from aphq_cli.artifacts import read_header, sha256_file
from aphq_cli.errors import AphqError
from aphq_cli.headers import stage_record
from aphq_cli.progress import describe, read_record
from aphq_cli.runs import ModelSource, STAGES, check_recorded_model, read_stage, stage_path, upstream_changes


def tensor_rows(path: Path) -> list[tuple[str, str, str, str]]:
    """``(name, dtype, shape, "min / mean / max")`` of every tensor, read one at a time."""
    rows = []
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            stats = ""
            if t.numel() and (t.is_floating_point() or t.dtype in (torch.int8, torch.uint8, torch.int32, torch.int64)):
                v = t.float()
                stats = f"{v.min().item():.4g} / {v.mean().item():.4g} / {v.max().item():.4g}"
            rows.append((name, str(t.dtype).replace("torch.", ""), str(tuple(t.shape)), stats))
    return rows


def header_fields(path: Path) -> dict[str, str]:
    """The aphq header as display strings, or the raw metadata of a foreign safetensors file."""
    try:
        header = read_header(path)
    except AphqError as err:
        if "was not written by aphq" not in str(err):
            raise
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    config = dict(header.config)
    qmap = config.pop("quantization_map", None)
    fields = {"quantization": map_summary(qmap)} if isinstance(qmap, dict) else {}
    return {"stage": header.stage, "format": str(header.format_version), "created": header.created, **fields,
            "config": json.dumps(config, indent=1, sort_keys=True),
            "inputs": "\n".join(f"{k}: {v[:16]}…" for k, v in sorted(header.inputs.items())),
            "extra": json.dumps(header.extra)}


def map_summary(qmap: dict) -> str:
    """A quantization map, one line per bit-width pair (``1 layers W4A8 (backbone.patch_embed.proj)``)."""
    groups: dict[str, list[str]] = {}
    for name, entry in qmap.items():
        bits = f"A{entry.get('a_bits')}"
        key = bits if entry.get("kind") == "matmul" else f"W{entry.get('w_bits')}{bits}"
        key += f" g{entry['w_group']}" if entry.get("w_group") else ""  # weights grouped per that many inputs
        groups.setdefault(key, []).append(name)
    lines = []
    for key, names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        kind = "matmuls" if key.startswith("A") else "layers"
        lines.append(f"{len(names)} {kind} {key}" + (f" ({', '.join(sorted(names))})" if len(names) <= 3 else ""))
    return "\n".join(lines)


@dataclass
class StageStatus:
    """One stage of a run: whether it exists and whether its inputs still match."""

    stage: str
    exists: bool
    current: bool | None = None
    detail: str = ""
    created: str = ""
    progress: dict | None = None  # the run's progress record, when this stage is (or was) being made

    @property
    def state(self) -> str:
        """``running``, ``stopped`` (its process is gone), ``missing``, ``damaged``, ``current`` or ``stale``."""
        if self.progress is not None:
            return self.progress["state"]
        if not self.exists:
            return "missing"
        if self.detail.startswith("damaged:"):
            return "damaged"
        return "current" if self.current else "stale"

    def to_json(self) -> dict:
        return {"stage": self.stage, "state": self.state, "exists": self.exists, "current": self.current,
                "made": self.created, "detail": self.detail, "progress": self.progress}


def _may_read(model: str, trust_config: bool) -> bool:
    try:
        check_recorded_model(model, trust_config)
        return True
    except AphqError:
        return False


def run_status(run: Path, trust_config: bool = False) -> list[StageStatus]:
    """Each pipeline stage of ``run``: present, current or stale (which input changed), progress."""
    if not Path(run).is_dir():
        raise AphqError(f"run folder {run} does not exist")
    out = [_stage_status(run, stage, trust_config) for stage in STAGES]
    record = read_record(run)
    for status in out:
        if record is not None and record.get("stage") == status.stage:
            status.progress = record
            status.detail = describe(record) + (f"; {status.detail}" if status.detail != "not run" else "")
    return out


def _stage_status(run: Path, stage: str, trust_config: bool) -> StageStatus:
    """One stage of ``run``: missing (with the blocks a resumable stage finished), damaged, current or stale."""
    path = stage_path(run, stage)
    if not path.is_file():
        return StageStatus(stage, False, detail=_blocks_done(run, stage) or "not run")
    unread = ""
    try:
        header, made = read_stage(run, stage)
    except AphqError as damaged:  # an edited, truncated, foreign or malformed file: never call it current
        return StageStatus(stage, True, False, f"damaged: {damaged}")
    changed = []
    ckpt = Path(made.checkpoint)
    if not ckpt.is_file() or sha256_file(ckpt) != header.inputs.get("checkpoint"):
        changed.append("checkpoint")
    elif not _may_read(made.model, trust_config):
        unread = made.model  # reading a config file runs it: not for a status line
    else:
        try:
            source = ModelSource.open(made.model, ckpt, Path(made.data) if made.data else None)
            dataset = source.calibration_dataset(made.calib_split or "train", image_ids=made.image_ids)
            if source.fingerprints(dataset)["data"] != header.inputs.get("data"):
                changed.append("data")
        except AphqError:
            changed.append("data")
    changed += upstream_changes(run, stage, header)
    protocol = made.protocol
    images = "published val-split images" if protocol == "val" else f"images: {protocol}"
    detail = f"{made.model}, checkpoint {ckpt.name}, {len(made.image_ids)} image(s) ({images})"
    if made.calibrate is not None:
        detail += f", W{made.w_bits}A{made.a_bits}"
    if changed:
        detail += "; changed since: " + ", ".join(changed)
    if unread:
        detail += f"; data not checked: model config {unread} is Python (pass --trust-config to read it)"
    return StageStatus(stage, True, not changed, detail, header.created)


def _blocks_done(run: Path, stage: str) -> str:
    """``"k of n blocks done"`` for a resumable stage interrupted midway, else empty."""
    blocks = Path(run) / stage.replace("-", "_") / "blocks"
    done = sorted(blocks.glob("*.safetensors")) if blocks.is_dir() else []
    if not done:
        return ""
    try:
        total = stage_record(read_header(done[0]), done[0]).total_blocks
    except AphqError:  # a damaged part is redone on resume; the count of parts is still worth showing
        total = None
    return f"{len(done)} of {total or '?'} blocks done"
