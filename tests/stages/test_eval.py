"""aphq eval: metric plumbing against a ground-truth oracle, and the real command."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from aphq_cli.cli import app
from aphq_cli.data.coco import build_dataset
from aphq_cli.models.zoo import load_config, resolve_model
from stages.eval import class_ap, coco_metrics, per_class_metrics, percent_metrics


def test_percent_metrics_names_and_scale():
    raw = {"bbox_mAP": 0.46, "bbox_mAP_50": 0.681, "bbox_mAP_s": -1.0, "segm_mAP": 0.416}
    out = percent_metrics(raw)
    assert out["bbox_AP"] == 46.0 and out["bbox_AP50"] == 68.1 and out["segm_AP"] == 41.6
    assert out["bbox_APs"] == -1.0  # COCO's "no such objects" marker survives
    assert out["segm_AP75"] == 0.0  # not produced (no detections) -> 0 AP
    assert len(out) == 12


def _oracle_results(dataset):
    """Per image: the ground truth as detections with score 1 (bbox, mask lists per class)."""
    from mmdet.core import encode_mask_results

    coco, results = dataset.coco, []
    for info in dataset.data_infos:
        bboxes = [np.zeros((0, 5), np.float32) for _ in dataset.CLASSES]
        masks = [[] for _ in dataset.CLASSES]
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]])):
            label = dataset.cat2label[ann["category_id"]]
            x, y, w, h = ann["bbox"]
            bboxes[label] = np.vstack([bboxes[label], [[x, y, x + w, y + h, 1.0]]]).astype(np.float32)
            masks[label].append(coco.annToMask(ann).astype(bool))
        results.append((bboxes, encode_mask_results(masks)))
    return results


def test_ground_truth_scores_100(synth_dir):
    dataset = build_dataset(load_config(resolve_model("tiny-mask-rcnn")), "test", synth_dir)
    metrics, log = coco_metrics(dataset, _oracle_results(dataset))
    assert metrics["bbox_AP"] == 100.0 and metrics["segm_AP"] == 100.0
    assert "Average Precision" in log


def test_class_ap_averages_thresholds_and_recall_points_of_all_areas():
    rng = np.random.default_rng(0)
    # (IoU thresholds, recall points, classes, area ranges, max detections)
    precision = rng.uniform(0, 1, size=(2, 3, 3, 4, 3))
    precision[:, :, 2] = -1  # class "c" has no ground truth
    precision[1, 2, 1, 0, -1] = -1  # a missing point is skipped, not counted as 0
    out = class_ap(precision, ["a", "b", "c"])
    assert set(out) == {"a", "b"}
    a = sum(precision[t, r, 0, 0, 2] for t in range(2) for r in range(3)) / 6
    b = sum(precision[t, r, 1, 0, 2] for t in range(2) for r in range(3) if (t, r) != (1, 2)) / 5
    assert out["a"] == round(100 * a, 1) and out["b"] == round(100 * b, 1)


def test_per_class_ap_isolates_a_missed_class_and_averages_to_the_overall_ap(synth_dir):
    dataset = build_dataset(load_config(resolve_model("tiny-mask-rcnn")), "test", synth_dir, limit=20)
    results = _oracle_results(dataset)
    missed = dataset.CLASSES.index("ellipse")
    for bboxes, masks in results:  # drop every ellipse
        bboxes[missed] = bboxes[missed][:0]
        masks[missed] = []
    metrics, _ = coco_metrics(dataset, results)
    per_class = per_class_metrics(dataset, results)
    for iou in ("bbox", "segm"):
        aps = per_class[iou]
        assert aps.pop("ellipse") == 0.0
        assert aps and set(aps.values()) == {100.0}
        assert np.mean(list(per_class[iou].values()) + [0.0]) == pytest.approx(metrics[f"{iou}_AP"], abs=0.05)


def test_per_class_ap_of_a_model_that_detects_nothing_is_zero(synth_dir):
    dataset = build_dataset(load_config(resolve_model("tiny-mask-rcnn")), "test", synth_dir)
    nothing = [([np.zeros((0, 5), np.float32) for _ in dataset.CLASSES], [[] for _ in dataset.CLASSES])
               for _ in range(len(dataset))]
    present = {dataset.coco.cats[a["category_id"]]["name"] for a in dataset.coco.loadAnns(
        dataset.coco.getAnnIds(imgIds=dataset.img_ids))}
    per_class = per_class_metrics(dataset, nothing)
    assert per_class == {iou: {c: 0.0 for c in dataset.CLASSES if c in present} for iou in ("bbox", "segm")}


def test_limit_restricts_the_evaluated_images(synth_dir):
    dataset = build_dataset(load_config(resolve_model("tiny-mask-rcnn")), "test", synth_dir, limit=2)
    assert len(dataset) == 2 and dataset.img_ids == [d["id"] for d in dataset.data_infos]
    results = _oracle_results(dataset)
    results[1] = (results[0][0], results[0][1])  # the second image gets the first's boxes
    metrics, _ = coco_metrics(dataset, results)
    assert 0 < metrics["bbox_AP"] < 100.0


def test_eval_command_writes_json(synth_dir, random_tiny_checkpoint, tmp_path):
    out = tmp_path / "metrics.json"
    proc = subprocess.run(
        [sys.executable, "-m", "aphq_cli", "eval", "--model", "tiny-mask-rcnn", "--data", str(synth_dir),
         "--checkpoint", str(random_tiny_checkpoint), "--limit", "2", "--json", str(out), "--per-class"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    metrics = json.loads(out.read_text())
    classes = set(load_config(resolve_model("tiny-mask-rcnn")).classes)
    assert metrics["images"] == 2
    for iou in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert -1.0 <= metrics[f"{iou}_{name}"] <= 100.0
        assert set(metrics["per_class"][iou]) <= classes
        assert all(0.0 <= v <= 100.0 for v in metrics["per_class"][iou].values())
    assert "box" in proc.stderr and "mask" in proc.stderr  # the results table
    assert "AP per class" in proc.stderr
    assert "Warning" not in proc.stderr  # mmdetection's per-evaluation notice stays out of the terminal


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/coco"], "data folder /nonexistent/coco does not exist"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--device", "tpu"], "--device 'tpu' is not"),
    (["--limit", "0"], "--limit must be at least 1"),
])
def test_bad_input_is_one_sentence(args, message, synth_dir, random_tiny_checkpoint):
    if "--data" not in args:
        args = args + ["--data", str(synth_dir)]
    args = args + ["--checkpoint", str(random_tiny_checkpoint)]
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
