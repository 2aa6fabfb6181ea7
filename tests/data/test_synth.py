"""Tests for the synthetic COCO-layout dataset generator."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from shapely.geometry import Polygon, box

from aphq_cli.data import synth
from aphq_cli.errors import AphqError

# pycocotools 2.0.11 trips a numpy 2 deprecation inside decode; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = synth.SynthSpec(num_train=6, num_val=4)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("synth") / "ds", SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _decode(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """The (H, W) bool mask pycocotools makes of one annotation's polygons."""
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))).astype(bool)


def _ann_file(root: Path, split: str) -> str:
    return str(root / "annotations" / f"instances_{split}.json")


def test_same_spec_gives_identical_files(small_dataset: Path, tmp_path: Path) -> None:
    again = synth.generate(tmp_path / "again", SMALL)
    first, second = _files(small_dataset), _files(again)
    assert sorted(first) == sorted(second)
    assert len(first) == 6 + 4 + 3
    for name in first:
        assert first[name] == second[name], name


def test_other_seed_differs() -> None:
    a = synth.render_sample(SMALL, "train", 0)
    b = synth.render_sample(synth.SynthSpec(seed=1, num_train=6, num_val=4), "train", 0)
    assert a.image.shape != b.image.shape or not np.array_equal(a.image, b.image)
    assert SMALL.key() != synth.SynthSpec(seed=1, num_train=6, num_val=4).key()


def test_coco_files_are_consistent(small_dataset: Path) -> None:
    for split, count in (("train", 6), ("val", 4)):
        coco = COCO(_ann_file(small_dataset, split))
        assert len(coco.getImgIds()) == count
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(synth.CLASSES)
        for img in coco.loadImgs(coco.getImgIds()):
            with Image.open(small_dataset / split / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"])
                assert im.mode == "RGB"
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert anns
            for ann in anns:
                x, y, w, h = ann["bbox"]
                assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
                assert w > 0 and h > 0 and ann["area"] > 0 and ann["iscrowd"] == 0
                seg = ann["segmentation"]
                assert isinstance(seg, list) and seg
                assert all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg)


def test_masks_match_drawn_pixels(small_dataset: Path) -> None:
    """pycocotools' masks of the annotations cover the pixels each object was drawn on."""
    ious = []
    for split in synth.SPLITS:
        coco = COCO(_ann_file(small_dataset, split))
        for img in coco.loadImgs(coco.getImgIds()):
            sample = synth.render_sample(SMALL, split, img["id"] - 1)
            # The PNG holds exactly the rendered pixels.
            with Image.open(small_dataset / split / img["file_name"]) as im:
                assert np.array_equal(np.asarray(im), sample.image)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert len(anns) == len(sample.objects)
            h, w = img["height"], img["width"]
            for k, ann in enumerate(anns):
                assert ann["category_id"] == sample.objects[k].category_id
                decoded = _decode(ann["segmentation"], h, w)
                drawn = sample.id_map == k + 1
                ious.append((decoded & drawn).sum() / (decoded | drawn).sum())
                # Area is the visible geometry's; the decoded mask's pixel count estimates it.
                assert abs(decoded.sum() - ann["area"]) <= 0.2 * ann["area"] + 10
    assert np.mean(ious) > 0.9
    assert np.min(ious) > 0.5


def test_split_holes_keeps_the_region() -> None:
    holes = [box(2, 2, 4, 4).exterior.coords, box(6, 6, 8, 8).exterior.coords]
    ring = Polygon(box(0, 0, 10, 10).exterior.coords, holes)
    pieces = synth.split_holes(ring)
    assert all(not p.interiors for p in pieces)
    assert sum(p.area for p in pieces) == pytest.approx(ring.area)
    # Pixels decoded from the hole-free pieces are the ring's pixels.
    polys = synth.coco_polygons(ring)
    decoded = _decode(polys, 10, 10)
    assert np.array_equal(decoded, synth.rasterize(ring, 0, 0, 10, 10))
    assert decoded.sum() == 100 - 8


def test_rasterize_uses_pixel_centres() -> None:
    # A square from 1.4 to 4.6 covers the centres 1.5 .. 4.5 (columns/rows 1-4).
    mask = synth.rasterize(box(1.4, 1.4, 4.6, 4.6), 0, 0, 6, 6)
    expected = np.zeros((6, 6), dtype=bool)
    expected[1:5, 1:5] = True
    assert np.array_equal(mask, expected)
    # A window offset into the image sees the same pixels.
    assert np.array_equal(synth.rasterize(box(1.4, 1.4, 4.6, 4.6), 1, 1, 4, 4), expected[1:5, 1:5])


def test_every_class_occurs() -> None:
    spec = synth.SynthSpec()
    counts = Counter(o.category_id for i in range(40) for o in synth.render_sample(spec, "val", i).objects)
    assert set(counts) == set(range(1, len(synth.CLASSES) + 1))


def test_ensure_dataset_reuses_folder(tmp_path: Path) -> None:
    calls = []
    path = synth.ensure_dataset(SMALL, root=tmp_path, progress=lambda d, t: calls.append((d, t)))
    assert path == tmp_path / f"synth-{SMALL.key()}"
    assert calls[0] == (0, 10) and calls[-1] == (10, 10)
    stamp = (path / "SPEC.json").stat().st_mtime_ns
    calls.clear()
    assert synth.ensure_dataset(SMALL, root=tmp_path, progress=lambda d, t: calls.append((d, t))) == path
    assert calls == [] and (path / "SPEC.json").stat().st_mtime_ns == stamp
    # Only the dataset remains: no temporary folder is left beside it.
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_partial_folder_is_not_a_dataset(tmp_path: Path) -> None:
    # What a killed run leaves: a temporary sibling with images but no SPEC.json.
    partial = tmp_path / f".synth-{SMALL.key()}.partial-x"
    (partial / "train").mkdir(parents=True)
    (partial / "train" / "000000.png").write_bytes(b"")
    path = synth.ensure_dataset(SMALL, root=tmp_path)
    assert synth.is_complete(path, SMALL)
    assert not synth.is_complete(partial, SMALL)


def test_generate_refuses_foreign_folder(tmp_path: Path, small_dataset: Path) -> None:
    foreign = tmp_path / "ds"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(AphqError, match="ds"):
        synth.generate(foreign, SMALL)
    # Another spec's dataset is also refused; the same spec is returned as is.
    with pytest.raises(AphqError):
        synth.generate(small_dataset, synth.SynthSpec(seed=3, num_train=6, num_val=4))
    assert synth.generate(small_dataset, SMALL) == small_dataset
    # An empty folder is fine to generate into.
    (tmp_path / "empty").mkdir()
    assert synth.is_complete(synth.generate(tmp_path / "empty", SMALL), SMALL)


def test_spec_validation_and_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(AphqError, match="min_objects"):
        synth.SynthSpec(min_objects=5, max_objects=2)
    with pytest.raises(AphqError, match="bogus"):
        synth.SynthSpec.from_dict({"seed": 0, "bogus": 1})
    assert synth.SynthSpec.from_dict(SMALL.to_dict()) == SMALL
    monkeypatch.setenv("APHQ_CACHE", str(tmp_path))
    assert synth.default_cache_root() == tmp_path
    monkeypatch.delenv("APHQ_CACHE")
    assert synth.default_cache_root() == Path.home() / ".cache" / "aphq"


def test_encode_png_round_trips(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(synth.encode_png(image))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert np.array_equal(np.asarray(im), image)


def test_generate_sweeps_the_partial_copies_of_killed_generators(tmp_path):
    """#22 item 7: a SIGKILLed generator's half-written folder goes at the next generation; a live one's stays."""
    import os
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid now names no process
    killed = tmp_path / f".synth.partial-{child.pid}-abc123"
    (killed / "train").mkdir(parents=True)
    live = tmp_path / f".synth.partial-{os.getpid()}-def456"
    live.mkdir()
    synth.generate(tmp_path / "synth", synth.SynthSpec(num_train=1, num_val=1))
    assert not killed.exists() and live.is_dir()
