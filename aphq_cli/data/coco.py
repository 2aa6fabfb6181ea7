"""COCO-layout data folders: locating splits, building datasets and loaders.

A data folder holds ``annotations/instances_<split>.json`` and one image
folder per split, as COCO 2017 does (``val2017/``) or as our synthetic
testbed does (``val/``). A config's data splits name their files relative to
``data_root``; ``--data DIR`` replaces that root.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
from pathlib import Path
from typing import Iterable, Literal

import torch
from mmcv.parallel import DataContainer
from PIL import Image, UnidentifiedImageError
from mmdet.datasets import build_dataloader, build_dataset as mmdet_build

from aphq_cli.errors import AphqError

Split = Literal["test", "calib"]


def _relative(path: str, root: str | None) -> str:
    """``path`` relative to ``root`` when it was written as ``root + '...'``."""
    if root and path.startswith(root):
        return path[len(root):]
    return path


def with_data_root(split_cfg: dict, data_dir: Path | None, cfg_root: str | None) -> dict:
    """A copy of one split's dataset config rooted at ``data_dir`` (or left as configured)."""
    split = copy.deepcopy(dict(split_cfg))
    root = split.pop("data_root", None) or cfg_root
    if data_dir is not None:
        split["ann_file"] = _relative(split["ann_file"], root)
        split["img_prefix"] = _relative(split.get("img_prefix", ""), root)
        root = str(data_dir)
    if root:
        split["ann_file"] = str(Path(root) / split["ann_file"])
        split["img_prefix"] = str(Path(root) / split.get("img_prefix", ""))
    return split


def dataset_config(cfg, split: Split, data_dir: Path | None) -> dict:
    """The dataset config of ``split`` with paths checked.

    Raises:
        AphqError: the data folder, annotation file or image folder is missing.
    """
    if data_dir is not None and not Path(data_dir).is_dir():
        raise AphqError(f"data folder {data_dir} does not exist")
    if split not in cfg.data:
        raise AphqError(f"model config has no data.{split} split")
    split_cfg = with_data_root(cfg.data[split], data_dir, cfg.get("data_root"))
    ann, images = Path(split_cfg["ann_file"]), Path(split_cfg["img_prefix"])
    if not ann.is_file():
        raise AphqError(f"annotation file {ann} does not exist (pass --data DIR with a COCO-layout folder)")
    if not images.is_dir():
        raise AphqError(f"image folder {images} does not exist")
    split_cfg["test_mode"] = True
    return split_cfg


def build_dataset(cfg, split: Split = "test", data_dir: Path | None = None,
                  limit: int | None = None, image_ids: Iterable[int] | None = None, check_files: bool = True):
    """Build an mmdetection ``CocoDataset`` for ``split``, optionally restricted.

    Args:
        limit: keep only the first ``limit`` images (in annotation-file order).
        image_ids: keep only these image ids, in this order.
        check_files: check every kept image file up front (:func:`check_images`).
    """
    split_cfg = dataset_config(cfg, split, data_dir)
    try:
        # pycocotools prints progress on stdout, which carries only data here.
        with contextlib.redirect_stdout(io.StringIO()):
            dataset = mmdet_build(split_cfg)
    except (KeyError, ValueError, TypeError, AssertionError) as err:
        raise AphqError(f"dataset {split_cfg['ann_file']} could not be loaded ({err})") from err
    if image_ids is not None:
        wanted = list(image_ids)
        index = {info["id"]: i for i, info in enumerate(dataset.data_infos)}
        unknown = [i for i in wanted if i not in index]
        if unknown:
            raise AphqError(f"image id(s) {unknown[:5]} are not in {split_cfg['ann_file']}")
        _restrict(dataset, [index[i] for i in wanted])
    if limit is not None:
        if limit < 1:
            raise AphqError(f"--limit must be at least 1, got {limit}")
        _restrict(dataset, list(range(min(limit, len(dataset)))))
    if len(dataset) == 0:
        raise AphqError(f"dataset {split_cfg['ann_file']} has no images")
    dataset.pipeline = NamedFailures(dataset.pipeline)
    if check_files:
        check_images(dataset)
    return dataset


def check_images(dataset) -> None:
    """Refuse a dataset with a missing, empty or unreadable image, or one of another size than declared.

    Only each file's header is read (milliseconds an image), so a bad file is
    named before the first image is processed, not after hours of work.
    An image whose header reads but whose pixels do not decode is named when
    it is loaded (:class:`NamedFailures`).
    """
    for info in dataset.data_infos:
        path = Path(dataset.img_prefix or "") / info["filename"]
        try:
            with Image.open(path) as image:
                size = image.size
        except FileNotFoundError:
            raise AphqError(f"image {path} listed in {dataset.ann_file} does not exist") from None
        except (UnidentifiedImageError, OSError) as err:
            empty = path.is_file() and path.stat().st_size == 0
            raise AphqError(f"image {path} is {'empty' if empty else 'not a readable image file'}") from err
        declared = (info.get("width"), info.get("height"))
        if size != declared:
            raise AphqError(f"image {path} is {size[0]}x{size[1]} pixels, but {dataset.ann_file} declares "
                            f"{declared[0]}x{declared[1]}")


class NamedFailures:
    """A dataset pipeline whose failure on an image is one error naming that image's file."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    def __call__(self, results: dict):
        try:
            return self.pipeline(results)
        except AphqError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure here is this image's; the message keeps its cause
            name = Path(results.get("img_prefix") or "") / results.get("img_info", {}).get("filename", "?")
            raise AphqError(f"image {name} could not be loaded ({type(err).__name__}: {err})") from err


# Where calibration and reconstruction images come from (method.md, "Calibration and
# reconstruction images in the published code"). "train": the config's calib split
# (train2017 through the deterministic test pipeline), our default. "val": the published
# protocol, the evaluation split itself (val2017), its annotated images in file order.
CALIB_SPLITS = ("train", "val")


def check_calib_split(value: str) -> None:
    """Refuse a calibration protocol other than :data:`CALIB_SPLITS`."""
    if value not in CALIB_SPLITS:
        raise AphqError(f"--calib-split must be one of {', '.join(CALIB_SPLITS)}, got {value!r}")


def calibration_dataset(cfg, protocol: str, data_dir: Path | None = None, limit: int | None = None,
                        image_ids: Iterable[int] | None = None):
    """The calibration/reconstruction images of a protocol of :data:`CALIB_SPLITS`.

    With ``"val"`` (and no ``image_ids``) images without an annotation of the
    dataset's classes are skipped before ``limit`` applies, as the published
    code's training-mode dataset skips them.
    """
    check_calib_split(protocol)
    if protocol == "train":
        return build_dataset(cfg, "calib", data_dir, limit=limit, image_ids=image_ids)
    dataset = build_dataset(cfg, "test", data_dir, image_ids=image_ids, check_files=False)
    if image_ids is None:
        cats = set(dataset.cat_ids)
        annotated = {a["image_id"] for a in dataset.coco.anns.values() if a["category_id"] in cats}
        _restrict(dataset, [i for i, info in enumerate(dataset.data_infos) if info["id"] in annotated])
    if limit is not None:
        _restrict(dataset, list(range(min(limit, len(dataset)))))
    if len(dataset) == 0:
        raise AphqError(f"dataset {dataset.ann_file} has no annotated images")
    check_images(dataset)
    return dataset


def _restrict(dataset, keep: list[int]) -> None:
    """Keep the images at positions ``keep``; evaluation then covers only those."""
    dataset.data_infos = [dataset.data_infos[i] for i in keep]
    dataset.img_ids = [info["id"] for info in dataset.data_infos]
    if hasattr(dataset, "flag"):
        dataset.flag = dataset.flag[keep]


def fingerprint_dataset(dataset) -> str:
    """sha256 of the annotation file and the ordered image ids a stage used."""
    h = hashlib.sha256()
    with open(dataset.ann_file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(repr(list(dataset.img_ids)).encode())
    return h.hexdigest()


def build_loader(dataset, workers: int = 0, dist: bool = False):
    """A deterministic, unshuffled loader of one image per batch.

    Args:
        dist: this rank's share only (mmdetection's DistributedSampler: rank r
            gets images r, r+K, ..., padded with the first images to equal shares).
    """
    return build_dataloader(dataset, samples_per_gpu=1, workers_per_gpu=workers, dist=dist,
                            shuffle=False, persistent_workers=False)


def to_device(batch: dict, device) -> dict:
    """Unwrap mmcv ``DataContainer``s of a one-GPU batch and move tensors to ``device``."""
    def unwrap(value):
        if isinstance(value, DataContainer):
            value = value.data[0]
        if isinstance(value, list):
            return [unwrap(v) for v in value]
        if isinstance(value, torch.Tensor):
            return value.to(device)
        return value  # image metas, BitmapMasks

    return {key: unwrap(value) for key, value in batch.items()}
