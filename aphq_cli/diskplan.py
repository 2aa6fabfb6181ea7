"""Disk a stage's on-disk caches will take, predicted before they are filled, and a check against free space.

At COCO size the caches are the largest thing a stage writes (reconstruct's
unit cache: tens of GiB for 256 images; mlp-recon's MLP cache more), and a
disk that fills hours into a run loses those hours. So a stage measures its
units' tensor shapes (a float forward on the meta device per image size, :func:`per_image_shapes`),
predicts the bytes of every cache file from them with the pure functions
here, byte for byte as :class:`~aphq_cli.tensorcache.TensorCache` writes them
(safetensors header + data per image, plus the ``DONE`` marker), and refuses
to start when the free space is smaller than what is still to be written.

Shapes are plain tuples here, so the planners are pure and a test or a cost
model (``benchmarks/scale.py``) can call them with any image count.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from aphq_cli.artifacts import atomic_write_text
from aphq_cli.errors import AphqError

Shapes = dict[str, tuple[int, ...]]  # the tensors of one cache file: name -> shape

_DTYPE_NAMES = {4: "F32", 2: "F16"}  # itemsize -> safetensors dtype name, for the floating caches
# Tensors a cache stores as they are (not in its floating dtype): the head records' labels and flags.
_STORED_AS_IS = {torch.int64: (8, "I64"), torch.bool: (1, "BOOL")}


def safetensors_bytes(shapes: Shapes, itemsize: int, dtypes: dict[str, torch.dtype] | None = None) -> int:
    """Size of the safetensors file ``safetensors.torch.save`` writes for these tensors.

    Its layout: an 8-byte length, a compact JSON header (tensor names in
    sorted order, each with dtype, shape and data offsets) padded with spaces
    to a multiple of 8, then the data. The offsets' digits are part of the
    header, which is why it is built here rather than estimated.

    Args:
        itemsize: bytes of a floating value (the cache's dtype).
        dtypes: the tensors that are not floating (``name -> torch.int64 or torch.bool``).
    """
    header, offset = {}, 0
    for name in sorted(shapes):
        size, dtype = _STORED_AS_IS.get((dtypes or {}).get(name), (itemsize, _DTYPE_NAMES[itemsize]))
        for dim in shapes[name]:
            size *= int(dim)
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shapes[name]],
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = len(json.dumps(header, separators=(",", ":")))
    return 8 + text + (-text) % 8 + offset


def done_marker_bytes(count: int, key: str) -> int:
    """Size of an entry's ``DONE`` marker, written as :meth:`TensorCache.finish` writes it."""
    return len(json.dumps({"count": count, "key": key}))


def entry_bytes(per_image: list[Shapes], itemsize: int, key: str, dtypes: dict[str, torch.dtype] | None = None) -> int:
    """A complete cache entry: one file per image (each its own shapes) and the marker."""
    return (sum(safetensors_bytes(shapes, itemsize, dtypes) for shapes in per_image)
            + done_marker_bytes(len(per_image), key))


def outputs(shapes: list[tuple[int, ...]]) -> Shapes:
    """A unit's outputs as reconstruct packs them (``t0``, ``t1``, ...)."""
    return {f"t{i}": tuple(s) for i, s in enumerate(shapes)}


@dataclass(frozen=True)
class CachePlan:
    """What one cache will hold.

    Attributes:
        folder: the cache folder.
        peak: bytes it holds at its fullest.
        entries: bytes of each entry once complete.
        written: bytes of the entries already complete on disk (a resumed
            run); they count as written.
    """

    folder: str
    peak: int
    entries: dict[str, int] = field(default_factory=dict)
    written: int = 0

    @property
    def to_write(self) -> int:
        return max(0, self.peak - self.written)

    def to_json(self) -> dict:
        return {"folder": self.folder, "peak_bytes": self.peak, "written_bytes": self.written,
                "to_write_bytes": self.to_write, "entry_bytes": self.entries}


@dataclass(frozen=True)
class HeadPlan:
    """The head units' entries of reconstruct's unit cache (``--heads``), in bytes.

    Attributes:
        records: ``rec``, the float model's RoIs and choices per image (an upper bound).
        targets: each head unit's float outputs ``y/<k>``, in unit order (upper bounds:
            as many RoIs per image as the test configs allow).
    """

    records: int
    targets: list[int]


# In the joint stream of reconstruct's two caches, the APH cache's entries carry this prefix.
APH = "aph:"


def unit_cache_entries(units: list[str], ios: list[dict[str, dict]], key: str,
                       loss: str, itemsize: int = 4, aph: dict[str, int] | None = None, drop_aph: bool = False,
                       heads: HeadPlan | None = None) -> list[tuple[str, str, int]]:
    """The fills and drops of reconstruct's unit cache, in order, as ``(op, entry, bytes)``.

    Mirrors ``UnitCaches.prepare`` and ``release`` in stages/reconstruct.py:
    unit k fills its quantized input ``q/k`` (unit k-1's output; the image
    for k = 0 is not cached), which makes ``q/(k-1)`` obsolete, then its
    float output ``y/k``; once k is done its float input ``y/(k-1)`` goes.
    The neck fills ``fp/k`` and ``q/k`` with the backbones' outputs after the
    last backbone unit's entries go; its target is computed as it is read.
    Fisher weights ``fisher/k`` stay to the end. The head units (``heads``)
    follow the neck and make the FPN outputs from the neck's inputs as they
    read them, so those stay; the first head fills the float records
    ``rec``, and each head fills its float outputs and drops them once done.

    Args:
        ios: per image, per unit name, ``{"in": [shapes], "out": [shapes]}`` (:func:`per_image_shapes`).
        aph: the APH cache's entry bytes by unit (:func:`aph_plan`), to plan both caches as one
            stream: a unit's APH entry is made as the unit starts (``aph:<name>``) and, with
            ``drop_aph`` (``reconstruct --drop-aph-cache``), removed once the unit is done.
    """
    def size(name, side):
        return entry_bytes([outputs(io[name][side]) for io in ios], itemsize, key)

    ops: list[tuple[str, str, int]] = []
    for k, name in enumerate(units):
        if name == "neck":
            if k > 0:
                ops += [("drop", f"q/{k - 1}", 0), ("drop", f"y/{k - 1}", 0)]
            ops += [("fill", f"fp/{k}", size(name, "in")), ("fill", f"q/{k}", size(name, "in"))]
        else:
            if k > 0:
                ops += [("fill", f"q/{k}", size(units[k - 1], "out")), ("drop", f"q/{k - 1}", 0)]
            ops.append(("fill", f"y/{k}", size(name, "out")))
            if loss == "fisher":
                ops.append(("fill", f"fisher/{k}", size(name, "out")))
        if aph and name in aph:
            ops.append(("fill", APH + name, aph[name]))
        ops.append(("peak", "", 0))  # unit k trains here, with its inputs and target present
        if k > 0 and name != "neck":
            ops.append(("drop", f"y/{k - 1}", 0))
        if aph and name in aph and drop_aph:
            ops.append(("drop", APH + name, 0))
    if heads and heads.targets:
        ops.append(("fill", "rec", heads.records))
        for k, target in enumerate(heads.targets, start=len(units)):
            ops += [("fill", f"y/{k}", target), ("peak", "", 0), ("drop", f"y/{k}", 0)]
    return ops


def peak_of(ops: list[tuple[str, str, int]], present: dict[str, int] | None = None) -> int:
    """The most bytes a cache holds while ``ops`` run, starting from the complete entries ``present``."""
    held = dict(present or {})
    peak = sum(held.values())
    for op, entry, size in ops:
        if op == "fill":
            held[entry] = size  # a complete entry is reused: the same bytes either way
        elif op == "drop":
            held.pop(entry, None)
        peak = max(peak, sum(held.values()))
    return peak


def reconstruct_plan(folder: Path, units: list[str], ios: list[dict[str, dict]], key: str, loss: str,
                     complete: dict[str, int] | None = None, itemsize: int = 4,
                     heads: HeadPlan | None = None) -> CachePlan:
    """The unit cache of reconstruct (``RUN/reconstruct/cache``; float32, or float16 with ``cache_dtype``).

    Args:
        complete: bytes of the entries already complete on disk (name -> bytes).
        itemsize: bytes per stored value (4, or 2 for a float16 cache).
        heads: the head units' entries (:class:`HeadPlan`), with ``--heads``.
    """
    if loss == "none" or not units:
        return CachePlan(str(folder), 0)
    ops = unit_cache_entries(units, ios, key, loss, itemsize, heads=heads)
    entries = {entry: size for op, entry, size in ops if op == "fill"}
    present = {k: v for k, v in (complete or {}).items() if k in entries}
    return CachePlan(str(folder), peak_of(ops, present), entries, sum(present.values()))


def joint_plan(unit: CachePlan, aph: CachePlan, units: list[str], ios: list[dict[str, dict]], key: str,
               loss: str, itemsize: int = 4, drop_aph: bool = False,
               complete: dict[str, int] | None = None, aph_complete: dict[str, int] | None = None,
               heads: HeadPlan | None = None) -> CachePlan:
    """reconstruct's unit cache and APH cache together, for when they share a filesystem.

    Their peaks come at different times (the unit cache's at the neck, whose
    inputs are the largest entries, when the APH maps are no longer read), so
    the disk they need together can be less than the sum of the two peaks;
    with ``drop_aph`` each unit's APH maps go once it is done.

    Args:
        unit, aph: the two caches' own plans (:func:`reconstruct_plan`, :func:`aph_plan`).
        complete, aph_complete: the entries already complete in each (name -> bytes).
    """
    if loss == "none" or not units:
        return CachePlan(unit.folder, 0)
    ops = unit_cache_entries(units, ios, key, loss, itemsize, aph.entries, drop_aph, heads)
    present = {k: v for k, v in (complete or {}).items() if k in unit.entries}
    present |= {APH + k: v for k, v in (aph_complete or {}).items() if k in aph.entries}
    return CachePlan(unit.folder, peak_of(ops, present), unit.entries | {APH + k: v for k, v in aph.entries.items()},
                     sum(present.values()))


def aph_plan(folder: Path, names: list[str], ios: list[dict[str, dict]],
             complete: dict[str, int] | None = None, itemsize: int = 2) -> CachePlan:
    """The shared APH cache (float16 unless ``itemsize`` says otherwise; one ``aph`` map per image and unit output)."""
    entries = {name: entry_bytes([{"aph": io[name]["out"][0]} for io in ios], itemsize, "") for name in names}
    present = {k: v for k, v in (complete or {}).items() if k in entries}
    return CachePlan(str(folder), sum(entries.values()), entries, sum(present.values()))


def mlp_plan(folder: Path, blocks: list[str], ios: list[dict[str, dict]], key: str,
             complete: dict[str, int] | None = None, keep: bool = False) -> CachePlan:
    """mlp-recon's MLP cache: each block's float MLP input ``x`` and output ``y`` per image (float32).

    Each block's entry is made just before the block trains and removed after
    it (unless ``keep``), so the peak is the largest entry plus whatever an
    earlier run left complete.

    Args:
        ios: per image, ``{"<block>.mlp": {"in": [shape], "out": [shape]}}``.
        keep: every entry stays (``--keep-cache``).
    """
    entries = {name: entry_bytes([{"x": io[f"{name}.mlp"]["in"][0], "y": io[f"{name}.mlp"]["out"][0]} for io in ios],
                                 4, key) for name in blocks}
    ops = [op for name in blocks for op in [("fill", name, entries[name])] + ([] if keep else [("drop", name, 0)])]
    present = {k: v for k, v in (complete or {}).items() if k in entries}
    return CachePlan(str(folder), peak_of(ops, present), entries, sum(present.values()))


def complete_entries(cache, names, count: int) -> dict[str, int]:
    """Bytes on disk of the entries of ``cache`` (a TensorCache) already complete for ``count`` images."""
    return {name: folder_bytes(Path(cache.root) / name) for name in names if cache.complete(name, count)}


def folder_bytes(path: Path) -> int:
    """Total size of the files under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:  # removed while walking (an atomic write's temp file)
                pass
    return total


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor: the filesystem a folder not made yet will be on."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_free_space(stage: str, plans: list[tuple[str, CachePlan]], free=None,
                     together: CachePlan | None = None) -> None:
    """Refuse to start a stage whose caches will not fit on their filesystems.

    Caches on the same filesystem add up. Called before anything is written,
    so a refused stage leaves the run folder and the caches as they were.

    Args:
        plans: ``(what, plan)`` pairs; ``what`` names the cache in the message.
        free: ``path -> free bytes`` (tests); default :func:`shutil.disk_usage`.
        together: all of ``plans`` as one (:func:`joint_plan`): what they need when they all
            share a filesystem, instead of the sum of their peaks.
    """
    free = free or (lambda p: shutil.disk_usage(p).free)
    by_fs: dict[int, list[tuple[str, CachePlan, Path]]] = {}
    for what, plan in plans:
        where = _existing(Path(plan.folder))
        by_fs.setdefault(os.stat(where).st_dev, []).append((what, plan, where))
    for group in by_fs.values():
        need = sum(plan.to_write for _, plan, _ in group)
        if together is not None and len(group) == len(plans):  # one filesystem: their joint peak
            need = together.to_write
        if not need:
            continue
        group = [item for item in group if item[1].to_write] or group  # the message names what grows
        available = free(group[0][2])
        if need > available:
            names = " and ".join(f"the {what} ({plan.folder}, {gib(plan.to_write)})" for what, plan, _ in group)
            raise AphqError(f"{stage} would write {gib(need)} to {names} but only {gib(available)} is free there; "
                            "free some space, use fewer --images, or set APHQ_CACHE to a larger disk")


def unit_io_shapes(model: nn.Module, names: list[str], img: torch.Tensor,
                   extra: dict[str, str] | None = None) -> dict[str, dict]:
    """Input and output tensor shapes of the named submodules, from one float feature pass of ``img``.

    Args:
        names: module names of ``model`` (``backbone.layers.0.blocks.0``, ``neck``).
        extra: more modules to measure, as ``key -> module name`` (a block's ``mlp``).

    Returns:
        ``{key: {"in": [shapes], "out": [shapes]}}``: tensors only, tuples flattened.
    """
    found: dict[str, dict] = {}
    targets = {name: name for name in names} | dict(extra or {})

    def tensors(value) -> list[tuple[int, ...]]:
        items = value if isinstance(value, (list, tuple)) else [value]
        flat = [t for v in items for t in (v if isinstance(v, (list, tuple)) else [v])]
        return [tuple(t.shape) for t in flat if isinstance(t, torch.Tensor)]

    handles = []
    for key, name in targets.items():
        def hook(module, args, out, key=key):
            found.setdefault(key, {"in": tensors(args), "out": tensors(out)})
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.extract_feat(img)
    finally:
        for h in handles:
            h.remove()
    return found


def per_image_shapes(model: nn.Module, names: list[str], images, extra: dict[str, str] | None = None) -> list[dict]:
    """:func:`unit_io_shapes` of every image: one shape-only feature pass per distinct input shape.

    Images of one dataset differ in size (the test pipeline keeps each
    image's aspect ratio), so one image's shapes times the count would be
    wrong either way; loading each image once more costs little next to the
    stage, and equal input shapes share one pass.
    """
    # On the meta device a pass computes shapes and nothing else: at COCO size on a CPU a real pass per
    # distinct image size would take minutes (dozens of aspect ratios in 256 images).
    meta = copy.deepcopy(model).to("meta")
    by_input: dict[tuple[int, ...], dict] = {}
    found = []
    for i in range(len(images)):
        img = images[i]
        if tuple(img.shape) not in by_input:
            by_input[tuple(img.shape)] = unit_io_shapes(meta, names, img.to("meta"), extra)
        found.append(by_input[tuple(img.shape)])
    return found


def write_plan(path: Path, plans: dict[str, CachePlan], images: int, **notes) -> None:
    """Record a stage's prediction next to its blocks, for ``benchmarks/scale.py`` and tests to compare."""
    record = {"images": images} | notes | {k: p.to_json() for k, p in plans.items()}
    atomic_write_text(path, json.dumps(record, indent=1))
