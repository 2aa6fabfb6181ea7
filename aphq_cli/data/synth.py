"""A synthetic COCO-layout instance segmentation dataset, generated on the spot.

No real COCO can be downloaded where this project runs, so small Swin Mask
R-CNN models are trained and quantized on this instead. It is meant to be hard
enough that 4-bit quantization visibly costs AP, yet learnable by a few-million
parameter model in a short schedule:

* seven classes, two pairs of which differ subtly (square vs rectangle, circle
  vs ellipse; a ring is a circle with a hole), with colours drawn
  independently of the class. (Version 1 also had hexagons: told apart from
  circles only at large sizes, they kept a small model near 11 box AP.)
* random rotation, sizes from 8 % of the shorter image side to all of it,
  drawn log-uniformly: about a third of the objects are small and one in
  eight large by COCO's area ranges (COCO itself: 41 %, 34 %, 24 %). Large
  objects matter for quantization: they are found on the deepest, coarsest
  features, where W4A4 error costs the most AP. (The first bundled models
  were trained with 12-45 %, which left under 1 % of the objects large.)
  Objects that reach past the border are cut there, as in photographs;
* textured backgrounds (smooth noise, gradients, stripes, soft blobs), mildly
  shaded or striped objects, some in colours close to their background;
* 3-8 objects per image that overlap: later objects are drawn on top, and
  each annotation is the *visible* part of its object;
* image sizes drawn per image, so they are not all multiples of the Swin
  window and patch sizes.

Geometry is exact (shapely); pixels and the COCO polygons both come from the
same geometry, and pixels are rasterized with the same rule COCO tools use
(a pixel belongs to a shape when its centre does), so the masks pycocotools
decodes agree with what is drawn.

Everything is deterministic: the same :class:`SynthSpec` gives byte-identical
files. Bump :data:`VERSION` whenever the generator's output changes, so cached
datasets made by an older generator are not reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image
from shapely import affinity
from shapely.geometry import MultiPolygon, Point, Polygon, box
from shapely.geometry.base import BaseGeometry

from aphq_cli.artifacts import process_alive
from aphq_cli.errors import AphqError

VERSION = 3
"""Generator version; part of :meth:`SynthSpec.key`. Bump on any output change."""

CLASSES: tuple[str, ...] = (
    "square",
    "rectangle",
    "circle",
    "ellipse",
    "ring",
    "triangle",
    "star",
)
"""Class names; category id ``i + 1`` is ``CLASSES[i]``."""

SPLITS: tuple[str, ...] = ("train", "val")

# An object is kept only while this much of it stays visible (after clipping to
# the image and occlusion by later objects). Below about 60 %, a half-hidden
# rectangle looks like a square and a ring cut in two like an arc, so the label
# would be noise that caps the AP any model can reach.
MIN_VISIBLE_FRAC = 0.6
MIN_VISIBLE_AREA = 16.0  # px^2
# Pieces of a visible region smaller than this are slivers left by occlusion;
# they would show up as one or two stray pixels, so they are dropped.
MIN_PIECE_AREA = 2.0  # px^2
# Rectangle and ellipse aspect ratios: far enough from 1 to tell them from a
# square or circle, close enough that it takes a careful look.
ASPECT_RANGE = (1.5, 2.5)
# Tries to place each object before giving up on it (crowded images).
PLACE_TRIES = 20
# Circles are polygons with 4 * CIRCLE_SEGS vertices: 32 keep the outline
# within about half a pixel of the true curve even for the largest ellipses,
# while keeping rasterization cheap.
CIRCLE_SEGS = 8


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. Every field is part of the cache key.

    Attributes:
        seed: Base seed; image ``i`` of split ``s`` uses ``(seed, s, i)``.
        num_train: Number of training images.
        num_val: Number of validation images.
        image_sizes: Width and height are each drawn from these, per image.
        min_objects: Fewest objects an image aims for.
        max_objects: Most objects an image aims for (crowded images may get
            fewer when an object cannot be placed without hiding another).
        min_object_frac: Smallest object extent, as a fraction of the shorter
            image side.
        max_object_frac: Largest object extent, same unit. Extents are drawn
            log-uniformly between the two, so small objects are common.
        low_contrast_prob: Chance that an object's colour is drawn close to
            the background's mean colour under it.
        noise_std: Standard deviation of the per-pixel luminance noise (0-255).
    """

    seed: int = 0
    num_train: int = 2000
    num_val: int = 200
    image_sizes: tuple[int, ...] = (224, 256, 288, 320)
    min_objects: int = 3
    max_objects: int = 8
    min_object_frac: float = 0.08
    max_object_frac: float = 1.0
    low_contrast_prob: float = 0.1
    noise_std: float = 4.0

    def __post_init__(self) -> None:
        # Store canonical types (a tuple of ints, 1 -> 1.0 for float fields), so
        # equal specs have equal keys and the spec stays hashable.
        for f in dataclasses.fields(self):
            if f.type in ("int", "float"):
                cast = int if f.type == "int" else float
                object.__setattr__(self, f.name, cast(getattr(self, f.name)))
        object.__setattr__(self, "image_sizes", tuple(int(s) for s in self.image_sizes))
        if self.num_train < 1 or self.num_val < 1:
            raise AphqError(
                f"SynthSpec needs at least one train and one val image, got "
                f"num_train={self.num_train}, num_val={self.num_val}."
            )
        if not self.image_sizes or min(self.image_sizes) < 32:
            raise AphqError(f"SynthSpec.image_sizes must be sizes of at least 32 px, got {self.image_sizes}.")
        if not 1 <= self.min_objects <= self.max_objects:
            raise AphqError(
                f"SynthSpec needs 1 <= min_objects <= max_objects, got "
                f"{self.min_objects} and {self.max_objects}."
            )
        if not 0 < self.min_object_frac <= self.max_object_frac <= 1:
            raise AphqError(
                f"SynthSpec needs 0 < min_object_frac <= max_object_frac <= 1, got "
                f"{self.min_object_frac} and {self.max_object_frac}."
            )
        if not 0 <= self.low_contrast_prob <= 1 or self.noise_std < 0:
            raise AphqError(
                f"SynthSpec needs low_contrast_prob in [0, 1] and noise_std >= 0, got "
                f"{self.low_contrast_prob} and {self.noise_std}."
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON types."""
        d = dataclasses.asdict(self)
        d["image_sizes"] = list(self.image_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SynthSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error.

        Raises:
            AphqError: If ``d`` has keys that are not fields.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise AphqError(f"Unknown SynthSpec keys {unknown}; known keys are {sorted(names)}.")
        return cls(**d)

    def key(self) -> str:
        """Short hash of the generator version and all fields, for folder names."""
        blob = json.dumps({"version": VERSION, "spec": self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SynthObject:
    """One placed object.

    Attributes:
        category_id: COCO category id, ``1..len(CLASSES)``.
        shape: The full shape in image coordinates (may extend past the image).
        visible: The part that shows: clipped to the image, minus every
            object drawn later, slivers removed.
    """

    category_id: int
    shape: Polygon
    visible: BaseGeometry


@dataclass(frozen=True)
class Sample:
    """One rendered image and what is in it.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB, exactly as written to the PNG.
        id_map: ``(H, W)`` int16; ``k + 1`` where object ``k`` shows, 0 on
            background. Lets tests compare annotations with drawn pixels.
        objects: The objects in drawing order (later ones on top); also the
            order of their annotations.
    """

    image: np.ndarray
    id_map: np.ndarray
    objects: tuple[SynthObject, ...]


# --------------------------------------------------------------------------- #
# Shape geometry


def _regular_polygon(n: int, radius: float, phase: float = 0.0) -> Polygon:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return Polygon(np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1))


def _star(points: int, outer: float, inner: float) -> Polygon:
    angles = np.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return Polygon(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1))


def _disk(radius: float) -> Polygon:
    return Point(0.0, 0.0).buffer(radius, quad_segs=CIRCLE_SEGS)


def shape_geometry(name: str, radius: float, aspect: float, inner: float) -> Polygon:
    """A class's shape centred on the origin, unrotated.

    Sizes are chosen so that, for one ``radius``, all classes cover a similar
    area: size alone should not give the class away.

    Args:
        name: One of :data:`CLASSES`.
        radius: Characteristic radius in pixels.
        aspect: Long/short side ratio for rectangles and ellipses.
        inner: Inner/outer radius ratio for rings and stars.

    Returns:
        The shape as a polygon (with one hole for a ring).
    """
    if name == "square":
        h = 0.85 * radius
        return box(-h, -h, h, h)
    if name == "rectangle":
        # Same area as the square of this radius, stretched.
        h = 0.85 * radius
        r = math.sqrt(aspect)
        return box(-h * r, -h / r, h * r, h / r)
    if name == "circle":
        return _disk(radius)
    if name == "ellipse":
        r = math.sqrt(aspect)
        return affinity.scale(_disk(radius), r, 1 / r, origin=(0, 0))
    if name == "ring":
        hole = _disk(inner * radius)
        return Polygon(_disk(radius).exterior.coords, [hole.exterior.coords])
    if name == "triangle":
        return _regular_polygon(3, 1.25 * radius, phase=np.pi / 2)
    if name == "star":
        return _star(5, 1.2 * radius, inner * 1.2 * radius)
    raise ValueError(f"unknown shape class {name!r}")


def random_shape(
    rng: np.random.Generator, category: int, width: int, height: int, spec: SynthSpec
) -> Polygon:
    """Draw size, proportions, rotation and position for one object.

    Args:
        rng: The image's generator.
        category: Index into :data:`CLASSES`.
        width: Image width.
        height: Image height.
        spec: Gives the extent range.

    Returns:
        The shape in image coordinates; its centre lies inside the image, so
        objects at the border are partly cut off.
    """
    side = min(width, height)
    # Log-uniform extent: every doubling of size is equally common, so small
    # objects carry real weight in the AP (about half are COCO "small").
    extent = math.exp(rng.uniform(math.log(spec.min_object_frac), math.log(spec.max_object_frac))) * side
    aspect = rng.uniform(*ASPECT_RANGE)
    name = CLASSES[category]
    inner = rng.uniform(0.42, 0.55) if name == "star" else rng.uniform(0.45, 0.65)
    geom = shape_geometry(name, extent / 2, aspect, inner)
    geom = affinity.rotate(geom, rng.uniform(0.0, 360.0), origin=(0, 0))
    return affinity.translate(geom, rng.uniform(0, width), rng.uniform(0, height))


def polygons_of(geom: BaseGeometry) -> list[Polygon]:
    """The non-empty polygons in any shapely geometry (drops lines and points)."""
    if isinstance(geom, Polygon):
        return [] if geom.is_empty else [geom]
    if hasattr(geom, "geoms"):
        return [p for g in geom.geoms for p in polygons_of(g)]
    return []


def drop_slivers(geom: BaseGeometry) -> MultiPolygon:
    """Keep only the pieces of ``geom`` of at least :data:`MIN_PIECE_AREA`."""
    return MultiPolygon([p for p in polygons_of(geom) if p.area >= MIN_PIECE_AREA])


def _visible_enough(visible: BaseGeometry, full_area: float) -> bool:
    return visible.area >= max(MIN_VISIBLE_AREA, MIN_VISIBLE_FRAC * full_area)


def place_objects(rng: np.random.Generator, width: int, height: int, spec: SynthSpec) -> list[SynthObject]:
    """Place objects one on top of the other, each keeping enough of itself.

    A candidate is rejected (and another drawn) when it would leave itself or
    any earlier object less than :data:`MIN_VISIBLE_FRAC` visible. So every
    drawn object is annotated: there are no unlabelled, mostly hidden objects
    for the model to be punished for finding.

    Args:
        rng: The image's generator.
        width: Image width.
        height: Image height.
        spec: Gives the object count and size ranges.

    Returns:
        The objects in drawing order.
    """
    frame = box(0, 0, width, height)
    target = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    categories: list[int] = []
    shapes: list[Polygon] = []
    visible: list[MultiPolygon] = []
    for _ in range(target * PLACE_TRIES):
        if len(shapes) == target:
            break
        category = int(rng.integers(len(CLASSES)))
        shape = random_shape(rng, category, width, height, spec)
        own = drop_slivers(shape.intersection(frame))
        if not _visible_enough(own, shape.area):
            continue
        below = [drop_slivers(v.difference(shape)) for v in visible]
        if not all(_visible_enough(v, s.area) for v, s in zip(below, shapes)):
            continue
        categories.append(category)
        shapes.append(shape)
        visible = below + [own]
    return [SynthObject(c + 1, s, v) for c, s, v in zip(categories, shapes, visible)]


# --------------------------------------------------------------------------- #
# Rasterization and textures


def _rings(geom: BaseGeometry) -> Iterator[np.ndarray]:
    for poly in polygons_of(geom):
        yield np.asarray(poly.exterior.coords)[:-1]
        for hole in poly.interiors:
            yield np.asarray(hole.coords)[:-1]


def rasterize(geom: BaseGeometry, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """Pixels of a window whose centres lie inside ``geom`` (even-odd rule).

    Pixel ``(r, c)`` of the window covers ``[x0 + c, x0 + c + 1)`` and
    ``[y0 + r, y0 + r + 1)``; it is inside when its centre is, the rule that
    pycocotools' polygon decoding follows. (PIL's ``ImageDraw.polygon`` also
    fills every pixel the outline touches, which grows masks by about half a
    pixel all round: a 10 px object would disagree with its annotation by
    ~20 % IoU.) Holes work because every ring's crossings are counted.

    Args:
        geom: Polygon(s), possibly with holes, in image coordinates.
        x0: Window's left column in the image.
        y0: Window's top row in the image.
        width: Window width.
        height: Window height.

    Returns:
        ``(height, width)`` bool mask.
    """
    ys = y0 + np.arange(height) + 0.5  # row centres
    flat = []
    for p in _rings(geom):
        q = np.roll(p, -1, axis=0)  # edge i runs p[i] -> q[i]
        lo = np.minimum(p[:, 1], q[:, 1])
        hi = np.maximum(p[:, 1], q[:, 1])
        # Half-open in y so a vertex on a row centre is counted once and
        # horizontal edges never.
        rows, edges = np.nonzero((ys[:, None] >= lo) & (ys[:, None] < hi))  # (R, E) -> pairs
        t = (ys[rows] - p[edges, 1]) / (q[edges, 1] - p[edges, 1])
        xs = p[edges, 0] + t * (q[edges, 0] - p[edges, 0])
        # First column whose centre lies right of the crossing: the crossing
        # toggles inside/outside for that column and every one after it.
        cols = np.clip(np.floor(xs - x0 - 0.5).astype(np.int64) + 1, 0, width)
        flat.append(rows * (width + 1) + cols)
    if not flat:
        return np.zeros((height, width), dtype=bool)
    toggles = np.bincount(np.concatenate(flat), minlength=height * (width + 1))
    return (np.cumsum(toggles.reshape(height, width + 1), axis=1)[:, :width] % 2) == 1


def _axes(width: int, height: int, x0: int = 0, y0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of a window as a row ``(1, W)`` and a column ``(H, 1)``.

    Kept 1-D so that separable patterns cost ``O(H + W)`` and the rest
    broadcasts to ``(H, W)`` only once.
    """
    xs = (x0 + np.arange(width, dtype=np.float32) + 0.5)[None, :]
    ys = (y0 + np.arange(height, dtype=np.float32) + 0.5)[:, None]
    return xs, ys


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _upsample(small: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bicubic upsampling of a coarse ``(h, w, 3)`` float image to ``(height, width, 3)``."""
    coarse = Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8))
    return np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    # A few random colours on a coarse grid, upsampled smoothly: large soft
    # colour fields with no edges of their own.
    gw, gh = (int(n) for n in rng.integers(2, 7, size=2))
    return _upsample(rng.integers(0, 256, size=(gh, gw, 3)).astype(np.float32), width, height)


def _gradient(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    xs, ys = _axes(width, height)
    theta = rng.uniform(0, 2 * np.pi)
    t = xs * np.cos(theta) + ys * np.sin(theta)  # (H, W) by broadcasting
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = _random_colour(rng), _random_colour(rng)
    return c0 + t[..., None] * (c1 - c0)


def _stripes(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    # Stripes from soft to nearly hard-edged: straight edges that are not
    # objects, so the model has to look at closed outlines.
    xs, ys = _axes(width, height)
    theta = rng.uniform(0, np.pi)
    freq = 2 * np.pi / rng.uniform(6, 40)  # period 6-40 px
    sharp = rng.uniform(1, 6)
    # sin(a(x) + b(y)) expanded so that only 1-D sines are computed.
    a = freq * np.cos(theta) * xs + rng.uniform(0, 2 * np.pi)  # (1, W)
    b = freq * np.sin(theta) * ys  # (H, 1)
    wave = np.sin(a) * np.cos(b) + np.cos(a) * np.sin(b)  # (H, W)
    t = 0.5 + 0.5 * np.tanh(sharp * wave) / np.tanh(sharp)
    c0, c1 = _random_colour(rng), _random_colour(rng)
    return c0 + t[..., None] * (c1 - c0)


def _blobs(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    # Soft Gaussian blobs: round-ish distractors without a crisp outline.
    # Being smooth (sigma >= 11 px), they are drawn on a 4x coarser grid and
    # upsampled, which is 16x less work.
    gw, gh = math.ceil(width / 4), math.ceil(height / 4)
    xs, ys = _axes(gw, gh)
    xs, ys = 4 * xs, 4 * ys  # coarse cell centres in full-resolution pixels
    out = np.broadcast_to(_random_colour(rng), (gh, gw, 3)).copy()
    side = min(width, height)
    for _ in range(int(rng.integers(3, 9))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        k = -0.5 / (rng.uniform(0.05, 0.2) * side) ** 2
        w = np.exp(k * (ys - cy) ** 2) * np.exp(k * (xs - cx) ** 2)  # separable: (h, 1) * (1, w)
        out += w[..., None] * (_random_colour(rng) - out)
    return _upsample(out, width, height)


_BACKGROUNDS: tuple[Callable[[np.random.Generator, int, int], np.ndarray], ...] = (
    _smooth_noise,
    _gradient,
    _stripes,
    _blobs,
)


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A textured background, ``(height, width, 3)`` float32 in [0, 255].

    One of smooth noise, a gradient, stripes or soft blobs, with a faint layer
    of smooth noise over it so no background is perfectly uniform.
    """
    kind = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    return 0.75 * kind(rng, width, height) + 0.25 * _smooth_noise(rng, width, height)


def object_colour(rng: np.random.Generator, under: np.ndarray, low_contrast_prob: float) -> np.ndarray:
    """An object's base colour, independent of its class.

    Args:
        rng: The image's generator.
        under: Mean background colour under the object, ``(3,)``.
        low_contrast_prob: Chance of a colour only 20-40 levels per channel
            away from ``under``.

    Returns:
        ``(3,)`` float32 colour.
    """
    if rng.random() >= low_contrast_prob:
        return _random_colour(rng)
    delta = rng.uniform(20, 40, size=3) * rng.choice([-1.0, 1.0], size=3)
    colour = under + delta
    # Step the other way where the first way leaves the valid range, rather
    # than clipping, which would shrink the difference.
    colour = np.where((colour < 0) | (colour > 255), under - delta, colour)
    return colour.astype(np.float32)


def object_fill(
    rng: np.random.Generator, colour: np.ndarray, shape: Polygon, xs: np.ndarray, ys: np.ndarray
) -> np.ndarray:
    """The object's pixels over a window: its colour with mild texture.

    Always a linear shading across the object (lit from a random side);
    sometimes fine stripes too.

    Args:
        rng: The image's generator.
        colour: Base colour, ``(3,)``.
        shape: The object, for its centre and size.
        xs: Pixel-centre x of the window, ``(1, w)``.
        ys: Pixel-centre y of the window, ``(h, 1)``.

    Returns:
        ``(h, w, 3)`` float32.
    """
    c = shape.centroid
    scale = max(math.sqrt(shape.area), 1.0)
    theta = rng.uniform(0, 2 * np.pi)
    along = ((xs - c.x) * np.cos(theta) + (ys - c.y) * np.sin(theta)) / scale  # ~[-0.7, 0.7]
    shade = rng.uniform(-30, 30) * along
    if rng.random() < 0.3:
        phi = rng.uniform(0, np.pi)
        across = (xs * np.cos(phi) + ys * np.sin(phi)) / rng.uniform(3, 8)
        shade = shade + rng.uniform(5, 12) * np.sin(2 * np.pi * across)
    return colour + shade[..., None]


def _window(geom: BaseGeometry, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel window ``(x0, y0, w, h)`` covering ``geom``'s bounds, inside the image."""
    minx, miny, maxx, maxy = geom.bounds
    x0, y0 = max(int(math.floor(minx)), 0), max(int(math.floor(miny)), 0)
    x1, y1 = min(int(math.ceil(maxx)), width), min(int(math.ceil(maxy)), height)
    return x0, y0, max(x1 - x0, 0), max(y1 - y0, 0)


# --------------------------------------------------------------------------- #
# Rendering


def image_rng(spec: SynthSpec, split: str, index: int) -> np.random.Generator:
    """The generator for one image: independent of every other image."""
    return np.random.default_rng([spec.seed, SPLITS.index(split), index])


def render_sample(spec: SynthSpec, split: str, index: int) -> Sample:
    """Render image ``index`` of ``split``: the same pixels and objects every time.

    Args:
        spec: The dataset spec.
        split: ``"train"`` or ``"val"``.
        index: Image index within the split.

    Returns:
        The image, its per-pixel object ids and its objects.
    """
    rng = image_rng(spec, split, index)
    width, height = (int(s) for s in rng.choice(spec.image_sizes, size=2))
    canvas = background(rng, width, height)
    objects = place_objects(rng, width, height, spec)
    id_map = np.zeros((height, width), dtype=np.int16)
    plain = canvas.copy()  # background before any object, for low-contrast colours
    for k, obj in enumerate(objects):
        x0, y0, w, h = _window(obj.shape, width, height)
        mask = rasterize(obj.shape, x0, y0, w, h)  # (h, w); a ring's hole stays False
        under = plain[y0 : y0 + h, x0 : x0 + w][mask].mean(axis=0) if mask.any() else plain.mean(axis=(0, 1))
        colour = object_colour(rng, under, spec.low_contrast_prob)
        xs, ys = _axes(w, h, x0, y0)
        fill = object_fill(rng, colour, obj.shape, xs, ys)
        # Later objects overwrite earlier ones: painting in z-order gives the
        # same occlusion as the geometric difference in place_objects.
        canvas[y0 : y0 + h, x0 : x0 + w][mask] = fill[mask]
        id_map[y0 : y0 + h, x0 : x0 + w][mask] = k + 1
    if spec.noise_std > 0:
        # Luminance noise, uniform with the requested std: a third of the
        # random numbers of per-channel Gaussian noise, and at this strength
        # it looks much the same.
        noise = rng.random((height, width, 1), dtype=np.float32) - 0.5
        canvas += (spec.noise_std * math.sqrt(12.0)) * noise
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Sample(image=image, id_map=id_map, objects=tuple(objects))


# --------------------------------------------------------------------------- #
# COCO annotations


def split_holes(poly: Polygon, depth: int = 0) -> list[Polygon]:
    """Cut a polygon with holes into hole-free pieces with the same union.

    A COCO polygon has no holes, so each hole is opened by cutting the polygon
    along a vertical line through the hole's interior; the halves are cut
    again until no piece has a hole.

    Args:
        poly: A valid polygon.
        depth: Recursion depth (internal).

    Returns:
        Hole-free polygons whose union is ``poly``.
    """
    if not poly.interiors:
        return [poly]
    if depth > 32:  # cannot happen for valid input: each cut opens a hole
        raise RuntimeError("split_holes did not converge")
    x = Polygon(poly.interiors[0]).representative_point().x
    minx, miny, maxx, maxy = poly.bounds
    halves = (box(minx - 1, miny - 1, x, maxy + 1), box(x, miny - 1, maxx + 1, maxy + 1))
    pieces = [p for half in halves for p in polygons_of(poly.intersection(half))]
    return [q for p in pieces for q in split_holes(p, depth + 1)]


def coco_polygons(geom: BaseGeometry) -> list[list[float]]:
    """COCO segmentation polygons (flat ``[x1, y1, x2, y2, ...]``, 2 decimals).

    Args:
        geom: A visible region, possibly in several pieces and with holes.

    Returns:
        One flat list per hole-free piece, each of at least 3 points.
    """
    out = []
    for poly in polygons_of(geom):
        for piece in split_holes(poly):
            coords = np.round(np.asarray(piece.exterior.coords)[:-1], 2)
            if len(coords) >= 3:
                out.append([float(v) for v in coords.ravel()])
    return out


def coco_annotation(obj: SynthObject, ann_id: int, image_id: int) -> dict[str, Any]:
    """The COCO annotation of one object's visible part."""
    minx, miny, maxx, maxy = obj.visible.bounds
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj.category_id,
        "segmentation": coco_polygons(obj.visible),
        "area": round(float(obj.visible.area), 2),
        "bbox": [round(float(v), 2) for v in (minx, miny, maxx - minx, maxy - miny)],
        "iscrowd": 0,
    }


def coco_categories() -> list[dict[str, Any]]:
    """COCO ``categories``: ids ``1..len(CLASSES)``."""
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]


# --------------------------------------------------------------------------- #
# Files


def encode_png(image: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 image as a PNG whose bytes depend on the pixels only.

    A plain PNG (any reader opens it), made here rather than by Pillow for
    speed: every row uses the "Up" filter and the deflate stream is
    Huffman-only, since the pixel noise defeats LZ matching anyway. Pillow's
    per-row filter search took longer than rendering the image, for files
    only 2 % smaller. No ancillary chunks (time, text) are written.

    Args:
        image: RGB pixels.

    Returns:
        The PNG file's bytes.
    """
    height, width, _ = image.shape
    rows = image.reshape(height, width * 3)
    up = np.empty_like(rows)
    up[0] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=up[1:])  # uint8 wraps modulo 256, as PNG wants
    filtered = np.concatenate([np.full((height, 1), 2, dtype=np.uint8), up], axis=1)  # filter byte 2 = Up
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    idat = deflate.compress(filtered.tobytes()) + deflate.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _spec_record(spec: SynthSpec) -> dict[str, Any]:
    """What SPEC.json holds: enough to tell whether a folder is this dataset."""
    return {"version": VERSION, "key": spec.key(), "classes": list(CLASSES), "spec": spec.to_dict()}


def _write_json(path: Path, obj: Any) -> None:
    # sort_keys and compact separators: the same content gives the same bytes.
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True, separators=(",", ":")))
        f.flush()
        os.fsync(f.fileno())


def is_complete(path: Path, spec: SynthSpec) -> bool:
    """Whether ``path`` holds this spec's dataset (SPEC.json matches, both annotation files exist)."""
    try:
        record = json.loads((path / "SPEC.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record == _spec_record(spec) and all(
        (path / "annotations" / f"instances_{s}.json").is_file() for s in SPLITS
    )


def _write_split(root: Path, split: str, spec: SynthSpec, tick: Callable[[], None]) -> None:
    (root / split).mkdir()
    count = spec.num_train if split == "train" else spec.num_val
    images, annotations = [], []
    for index in range(count):
        sample = render_sample(spec, split, index)
        name = f"{index:06d}.png"
        (root / split / name).write_bytes(encode_png(sample.image))
        height, width = sample.image.shape[:2]
        image_id = index + 1
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for obj in sample.objects:
            annotations.append(coco_annotation(obj, len(annotations) + 1, image_id))
        tick()
    coco = {
        "info": {"description": f"aphq synthetic shapes v{VERSION}, spec {spec.key()}, {split}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    _write_json(root / "annotations" / f"instances_{split}.json", coco)


def generate(
    out_dir: Path,
    spec: SynthSpec = SynthSpec(),
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the dataset for ``spec`` to ``out_dir``, atomically.

    Layout: ``train/NNNNNN.png``, ``val/NNNNNN.png``,
    ``annotations/instances_{train,val}.json`` and ``SPEC.json``. Everything is
    written into a temporary sibling folder that is renamed into place at the
    end, so a killed run leaves no dataset rather than half of one.

    Args:
        out_dir: Destination folder; must not exist, or be empty, or already
            hold this spec's dataset (then it is returned untouched).
        spec: What to generate.
        progress: Called as ``progress(done, total)`` once with ``done=0``
            before the first image and then after each image.

    Returns:
        ``out_dir``.

    Raises:
        AphqError: If ``out_dir`` holds anything else.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        if is_complete(out_dir, spec):
            return out_dir
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise AphqError(
                f"{out_dir} exists and is not the synthetic dataset for spec {spec.key()}; "
                f"delete it or choose another folder."
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    total = spec.num_train + spec.num_val
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    sweep_partial(out_dir)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(out_dir) + f"{os.getpid()}-", dir=out_dir.parent))
    except OSError as err:
        raise AphqError(f"cannot write the synthetic dataset next to {out_dir}: {err.strerror}") from err
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is not
        (tmp / "annotations").mkdir()
        for split in SPLITS:
            _write_split(tmp, split, spec, tick)
        _write_json(tmp / "SPEC.json", _spec_record(spec))
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); rename cannot replace it everywhere
        try:
            os.replace(tmp, out_dir)
        except OSError:
            # Another process finished the same dataset first: use theirs.
            if is_complete(out_dir, spec):
                shutil.rmtree(tmp, ignore_errors=True)
                return out_dir
            raise
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk, a quota, a folder gone read-only
            raise AphqError(f"could not write the synthetic dataset to {out_dir}: "
                            f"{err.strerror or err}; nothing was left behind") from err
        raise
    return out_dir


def _partial_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.partial-"


def sweep_partial(out_dir: Path) -> list[Path]:
    """Remove the half-written copies of ``out_dir`` that killed generators left beside it.

    A generator writes into ``.<name>.partial-<pid>-<random>`` and renames it
    into place at the end; SIGKILL leaves the folder behind. One whose process
    is gone is removed; a live generator's (another process making the same
    dataset right now) is left alone.
    """
    removed = []
    parent = Path(out_dir).parent
    if not parent.is_dir():
        return removed
    for path in parent.glob(_partial_prefix(Path(out_dir)) + "*"):
        pid = path.name[len(_partial_prefix(Path(out_dir))):].split("-", 1)[0]
        if path.is_dir() and not (pid.isdigit() and process_alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed



def default_cache_root() -> Path:
    """``$APHQ_CACHE`` if set, else ``~/.cache/aphq``."""
    env = os.environ.get("APHQ_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "aphq"


def ensure_dataset(
    spec: SynthSpec = SynthSpec(),
    root: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """The dataset folder for ``spec``, generated on first use.

    Args:
        spec: What to generate.
        root: Cache folder; :func:`default_cache_root` when None.
        progress: Passed to :func:`generate` when generation is needed.

    Returns:
        ``root / f"synth-{spec.key()}"``.

    Raises:
        AphqError: If that folder exists but holds something else.
    """
    path = Path(root if root is not None else default_cache_root()) / f"synth-{spec.key()}"
    if is_complete(path, spec):
        return path
    return generate(path, spec, progress=progress)

