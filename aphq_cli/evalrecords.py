"""What ``aphq eval`` reports, and the record of it a run folder keeps (``RUN/eval/NAME.json``).

Read by ``aphq status`` and ``aphq report`` as well as written by ``eval``, so
it lives in the library, not in the eval stage.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aphq_cli.artifacts import atomic_write_text


@dataclass
class EvalResult:
    """What ``aphq eval`` reports.

    Attributes:
        metrics: ``bbox_AP``, ``bbox_AP50``, ... ``segm_APl`` in percent.
        model, checkpoint, data: what was evaluated.
        images: how many images.
        seconds: wall time of inference plus evaluation.
        log: pycocotools' printed summary, kept for ``--verbose``.
        per_class: ``{"bbox": {class: AP}, "segm": {...}}`` in percent, when
            asked for (``--per-class``); a class with no ground truth in the
            evaluated images is left out.
        calib_split: for a quantized model, where its calibration and
            reconstruction images came from (``train``, or ``val``: the
            published protocol, whose images are among those evaluated);
            empty for a float model.
        note: what the user should know about the result that is not a
            metric (it was not recorded in a read-only run folder).
    """

    metrics: dict[str, float]
    model: str
    checkpoint: str
    data: str
    images: int
    seconds: float
    log: str = field(default="", repr=False)
    reused: bool = field(default=False, repr=False)
    per_class: dict[str, dict[str, float]] | None = None
    calib_split: str = ""
    note: str = field(default="", repr=False)

    def to_json(self) -> dict:
        out = dict(self.metrics)
        skip = ("metrics", "log", "reused", "note") + (("per_class",) if self.per_class is None else ())
        out.update({k: v for k, v in asdict(self).items() if k not in skip})
        return out


def write_eval_record(path: Path, result: EvalResult, key: dict) -> Path:
    """Record ``result`` and the key it was made from (atomically)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(result.to_json() | {"key": key}, indent=2) + "\n")


def eval_record_path(run: Path, name: str) -> Path:
    """Where a run folder keeps the last evaluation of ``name`` (a stage, ``fp`` or ``export``)."""
    return Path(run) / "eval" / f"{name}.json"


def read_eval_record(path: Path) -> tuple[EvalResult, dict] | None:
    """A recorded evaluation and the key (weights, annotations, images) it was made from; None if unreadable."""
    try:
        data = json.loads(Path(path).read_text())
        key = data.pop("key")
        metrics = {k: float(data.pop(k)) for k in list(data) if k.startswith(("bbox_", "segm_"))}
        fields = {k: data[k] for k in ("model", "checkpoint", "data", "images", "seconds")}
        per_class = data.get("per_class")
        if per_class is not None:
            per_class = {iou: {c: float(v) for c, v in aps.items()} for iou, aps in per_class.items()}
        return EvalResult(metrics, **fields, reused=True, per_class=per_class,
                          calib_split=str(data.get("calib_split", ""))), key
    except (OSError, ValueError, KeyError, TypeError):
        return None
