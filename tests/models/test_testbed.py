"""The bundled testbed detectors: strict loading and an accuracy floor on the synthetic val split.

On the first 40 val images (data generator version 3, objects up to the whole
image side) the bundled tiny-mask-rcnn scores 52.3 box / 55.9 mask AP
(`aphq eval --model tiny-mask-rcnn --limit 40`, measured 2026-11-27) and
tiny-cascade-mask-rcnn 48.4 box / 46.9 mask AP; the floors sit about 3 points
under, so a broken loader, pipeline or evaluation fails (random weights score
0), while small numeric differences between machines do not.
"""

import json

import pytest

from aphq_cli.models.checkpoint import read_state_dict
from aphq_cli.models.zoo import builtin_models, load_model
from stages.eval import evaluate

FLOORS = {"tiny-mask-rcnn": (49.5, 53.0), "tiny-cascade-mask-rcnn": (45.5, 44.0)}  # box, mask AP


@pytest.mark.parametrize("name", list(FLOORS))
def test_bundled_weights_are_small_and_load_strictly(name):
    spec = builtin_models()[name]
    # float16; the cascade's three 4conv1fc heads make it 11.4 MiB, the Mask R-CNN 6.9 MiB.
    assert spec.weights is not None and spec.weights.stat().st_size < 12 * 2 ** 20
    record = json.loads(spec.weights.with_suffix(".json").read_text())
    assert record["model"] == name and record["command"].startswith("python scripts/train_testbed.py")
    model, _, path = load_model(name)  # strict: raises on any missing or unexpected key
    assert path == spec.weights
    assert set(read_state_dict(path)) == set(model.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FLOORS))
def test_bundled_weights_reach_their_floor(name):
    result = evaluate(model=name, limit=40)
    box, mask = FLOORS[name]
    assert result.metrics["bbox_AP"] >= box
    assert result.metrics["segm_AP"] >= mask
