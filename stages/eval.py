"""Stage: COCO box and mask AP of a detector, through mmdetection's evaluate."""

from __future__ import annotations

import contextlib
import io
import json
import time
import warnings
from pathlib import Path

import torch
from mmdet.core import encode_mask_results
from pycocotools.cocoeval import COCOeval

from aphq_cli import distributed
from aphq_cli.artifacts import atomic_write_text, sha256_file
from aphq_cli.data.coco import build_dataset, build_loader, to_device
from aphq_cli.devices import resolve_device
from aphq_cli.errors import AphqError
from aphq_cli.headers import ExportRecord, stage_record
from aphq_cli.evalrecords import EvalResult, eval_record_path, read_eval_record, write_eval_record
from aphq_cli.exports import load_export
from aphq_cli.quant.wrap import keep_float as turn_off
from aphq_cli.runs import (ModelSource, can_write, check_output, load_stage, newest_stage, read_stage, same_model,
                           stage_path)


# mmdetection metric suffix -> our name; values are reported in percent.
_METRICS = {"mAP": "AP", "mAP_50": "AP50", "mAP_75": "AP75", "mAP_s": "APs", "mAP_m": "APm", "mAP_l": "APl"}
IOU_TYPES = ("bbox", "segm")


def percent_metrics(mmdet_results: dict) -> dict[str, float]:
    """mmdetection's ``bbox_mAP``-style fractions -> ``bbox_AP``-style percents.

    A metric mmdetection did not produce (it skips an IoU type when there are
    no detections at all) is reported as 0.0, which is what COCO AP is then.
    """
    out = {}
    for iou in IOU_TYPES:
        for src, dst in _METRICS.items():
            value = float(mmdet_results.get(f"{iou}_{src}", 0.0))
            out[f"{iou}_{dst}"] = round(100.0 * value, 1) if value >= 0 else -1.0
    return out


def run_inference(detector, dataset, *, device: str, progress=None) -> list:
    """Predictions for every image, masks RLE-encoded as mmdetection's test loop does.

    Under torchrun each rank predicts its share and every rank gets all
    predictions back, in dataset order.

    Args:
        progress: optional callable ``(done, total)`` (this rank's share).
    """
    results = []
    loader = build_loader(dataset, dist=distributed.rank_world()[1] > 1)
    share = len(loader)
    detector.eval()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            out = detector(return_loss=False, rescale=True, **to_device(batch, device))
            for item in out:
                if isinstance(item, tuple):  # (bbox results, mask results)
                    item = (item[0], encode_mask_results(item[1]))
                results.append(item)
            if progress is not None:
                progress(i + 1, share)
    return distributed.gather_in_order(results, len(dataset))


def class_ap(precision, classes) -> dict[str, float]:
    """Per-class AP in percent from COCOeval's ``eval["precision"]``.

    ``precision`` has axes (IoU threshold, recall point, class, area range,
    max detections); a class's AP is the mean over thresholds and recall
    points for all areas at the largest detection count, which is how COCO's
    overall AP averages them too. Entries of -1 mean "no ground truth": a
    class with nothing else is left out.
    """
    out = {}
    for k, name in enumerate(classes):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        if p.size:
            out[name] = round(100.0 * float(p.mean()), 1)
    return out


def per_class_metrics(dataset, results: list) -> dict[str, dict[str, float]]:
    """``{"bbox": {class: AP}, "segm": {...}}`` for mmdetection-style ``results``.

    Scored with the same COCOeval parameters as mmdetection's ``evaluate``
    (its classes, images and detection counts), so the mean over classes is
    its overall AP.
    """
    with_masks = isinstance(results[0], tuple)
    boxes, masks = dataset._segm2json(results) if with_masks else (dataset._det2json(results), None)
    out = {}
    for iou, dets in (("bbox", boxes), ("segm", masks)):
        if dets is None:
            continue
        if not dets:  # nothing detected: every class with ground truth scores 0
            out[iou] = {name: 0.0 for name, cat in zip(dataset.CLASSES, dataset.cat_ids)
                        if dataset.coco.getAnnIds(imgIds=dataset.img_ids, catIds=[cat])}
            continue
        if iou == "segm":  # as mmdetection does: mask areas, not box areas
            dets = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(dataset.coco, dataset.coco.loadRes(dets), iou)
            ev.params.catIds, ev.params.imgIds, ev.params.maxDets = dataset.cat_ids, dataset.img_ids, [100, 300, 1000]
            ev.evaluate()
            ev.accumulate()
        out[iou] = class_ap(ev.eval["precision"], dataset.CLASSES)
    return out


def coco_metrics(dataset, results: list) -> tuple[dict[str, float], str]:
    """Evaluate with pycocotools; returns percent metrics and the printed summary."""
    metrics = [m for m in IOU_TYPES if m == "bbox" or isinstance(results[0], tuple)]
    log = io.StringIO()
    # pycocotools prints its summary on stdout, which belongs to data (--json);
    # mmdetection warns about a deleted key on every mask evaluation, after
    # resetting the filters itself, so an "ignore" filter cannot stop it:
    # recording catches whatever it warns.
    with contextlib.redirect_stdout(log), warnings.catch_warnings(record=True):
        raw = dataset.evaluate(results, metric=metrics)
    return percent_metrics(raw), log.getvalue()


DEFAULT_MODEL = "tiny-mask-rcnn"


def evaluate(*, model: str | None = None, checkpoint: Path | None = None, data: Path | None = None,
             run: Path | None = None, stage: str | None = None, artifact: Path | None = None,
             limit: int | None = None, keep_float: list[str] | None = None, per_class: bool = False,
             device: str = "cpu", trust_checkpoint: bool = False, json_path: Path | None = None,
             record_run: Path | None = None, reuse: bool = False, trust_config: bool = False,
             progress=None) -> EvalResult:
    """Evaluate a detector's box and mask AP on a COCO-layout split.

    Args:
        model: built-in model name or mmdetection config path (float model;
            ``tiny-mask-rcnn`` by default). With ``run`` it must name the
            model the run was made with (a config path is then read).
        checkpoint: weights; a testbed model's bundled weights by default.
            With ``run`` it must be the checkpoint the run was made from.
        data: COCO-layout folder; by default the config's ``data_root``, the
            testbed's synthetic data, or the folder a run was made with.
        run: evaluate a stage of this run folder instead of a float model.
        stage: which stage of ``run``; the newest by default.
        artifact: evaluate an ``aphq export`` file instead, rebuilt from it alone.
        limit: evaluate only the first N images.
        keep_float: parts of a quantized model (``run`` or ``artifact``) to run
            in float (``roi_head``, ``backbone:w``; see ``keep_float``), to see
            where quantization costs accuracy; a reconstruct stage's rounded
            weights take their calibrated float values back. Such a result is
            not recorded.
        per_class: also score each class on its own (``EvalResult.per_class``).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        trust_checkpoint: allow a pickled checkpoint with arbitrary objects.
        json_path: write the metrics there as JSON (atomically).
        record_run: also record the result in this run folder's ``eval/``
            (a stage of ``run`` is always recorded in ``run``), where
            ``aphq report`` finds it.
        trust_config: read a model config file that a ``--run`` header names
            (it is Python); without it, only when ``model`` names the same file.
        reuse: return the recorded result instead of evaluating again when
            it was made from the same weights, annotations and images.
        progress: optional callable ``(done, total)``.
    """
    if keep_float and artifact is None and run is None:
        raise AphqError("--keep-float applies to a quantized model: give --run or --artifact")
    if json_path is not None:  # what is known before loading anything; the rest once the data is resolved
        check_output(json_path, "--json", inputs=[artifact, checkpoint], runs=[run, record_run])
    dev = resolve_device(distributed.init(device))
    if artifact is not None and (model is not None or checkpoint is not None):
        raise AphqError(f"--artifact {artifact} holds its own model and weights; drop --model and --checkpoint")
    if run is not None:
        _check_run_options(run, stage or newest_stage(run), model, checkpoint)
    if artifact is not None:
        detector, cfg, header = load_export(artifact, dev)
        made = ExportRecord.from_dict(header.config, artifact)
        dataset = _test_split(cfg, data if data is not None else (Path(made.data) if made.data else None), limit)
        label, weights = f"{made.model} [export]", str(artifact)
        name, made_from = "export", Path(artifact)
        protocol = made.calib_split or "train"
    elif run is not None:
        stage = stage or newest_stage(run)
        detector, source, header = load_stage(run, stage, dev, trust_checkpoint=trust_checkpoint,
                                             trust_config=trust_config or model)
        protocol = stage_record(header, stage_path(run, stage)).protocol
        dataset = _test_split(source.cfg, data if data is not None else source.data, limit)
        label, weights = f"{source.spec.name} [{stage}]", str(source.checkpoint)
        name, made_from, record_run = stage, stage_path(run, stage), run
    else:
        source = ModelSource.open(model or DEFAULT_MODEL, checkpoint, data, trust_checkpoint=trust_checkpoint)
        # Check the data before the (slow) model build, so a typo fails at once.
        dataset = _test_split(source.cfg, data if data is not None else source.data, limit)
        detector = source.build(dev)
        label, weights = f"{source.spec.name} [fp]", str(source.checkpoint)
        name, made_from = "fp", source.checkpoint
        protocol = ""
    if keep_float:
        originals = None
        if artifact is None and stage == "reconstruct":
            # Reconstruct leaves its weights on their grids; their float values are the calibrated model's
            # (loaded only if a named weight is rounded, on the CPU: only its weights are read).
            def originals():
                return load_stage(run, "calibrate", torch.device("cpu"), trust_checkpoint=trust_checkpoint,
                                  trust_config=trust_config or model)[0]
        try:
            turn_off(detector, keep_float, originals)
        except ValueError as e:
            raise AphqError(f"--keep-float {e}") from None
        label, record_run = f"{label[:-1]}, float: {' '.join(keep_float)}]", None
    if json_path is not None:
        check_output(json_path, "--json", inputs=[made_from, weights, dataset.ann_file], runs=[run, record_run])
    key = {"weights": sha256_file(made_from), "annotations": sha256_file(dataset.ann_file), "images": len(dataset)}
    record = eval_record_path(record_run, name) if record_run is not None else None
    note = ""
    if record is not None and distributed.is_main() and not can_write(record.parent):
        # A run folder one may read but not write (a colleague's, a read-only mount): evaluate all
        # the same, and say that the result was not kept, rather than fail after the whole evaluation.
        note, record = f"run folder {record_run} is not writable: this result is not recorded in it", None
    if (reuse and record is not None and (old := read_eval_record(record)) is not None and old[1] == key
            and (old[0].per_class is not None or not per_class)):
        return old[0]
    start = time.perf_counter()
    results = run_inference(detector, dataset, device=dev, progress=progress)
    # One rank scores the gathered predictions; the others get its numbers.
    def score():
        return coco_metrics(dataset, results) + ((per_class_metrics(dataset, results) if per_class else None),)

    metrics, log, classes = distributed.broadcast(score() if distributed.is_main() else None)
    result = EvalResult(metrics, label, weights, str(Path(dataset.ann_file).parent.parent), len(dataset),
                        round(time.perf_counter() - start, 2), log, per_class=classes, calib_split=protocol,
                        note=note)
    if not distributed.is_main():
        return result
    if json_path is not None:
        atomic_write_text(Path(json_path), json.dumps(result.to_json(), indent=2) + "\n")
    if record is not None:
        write_eval_record(record, result, key)
    return result


def _check_run_options(run: Path, stage: str, model: str | None, checkpoint: Path | None) -> None:
    """Refuse a ``--model`` or ``--checkpoint`` that is not what the run's stage was made from.

    Neither can change what a stage artifact describes, so one that differs
    would otherwise be silently ignored.
    """
    header, made = read_stage(run, stage)
    if model is not None and not same_model(model, made.model):
        raise AphqError(f"--model {model} is not the model {stage_path(run, stage)} was made with ({made.model}); "
                        "drop --model, or evaluate the float model without --run")
    if checkpoint is not None and sha256_file(checkpoint) != header.inputs.get("checkpoint"):
        raise AphqError(f"--checkpoint {checkpoint} is not the checkpoint {stage_path(run, stage)} was made from "
                        f"({made.checkpoint}); drop --checkpoint, or evaluate it without --run")


def _test_split(cfg, data: Path | None, limit: int | None):
    return build_dataset(cfg, "test", Path(data) if data is not None else None, limit=limit)
