"""The visual world's checker: reads shapes, colours, sizes, positions and motions back
from an image or a clip, without a learned model, so generated media can be scored.

How an image is read (:func:`read_image`):

1. **Background**: the median colour of the one-pixel border, named by the nearest
   background of the palette.
2. **Objects**: pixels farther than ``0.25`` (RGB distance; every object colour is at least
   0.42 from the backgrounds it is drawn on) from the background form a mask; its 8-connected components
   (label propagation by max-pooling) larger than a few pixels are objects.
3. **Colour**: the median of a component's most saturated pixels (its interior, free of
   anti-aliased edges), named by the nearest palette colour.
4. **Coverage and box**: each pixel's coverage ``alpha`` is its projection on the line
   from the background to the object colour; the object's box comes from the row and
   column profiles of ``alpha`` (sub-pixel, since every shape fills its box).
5. **Size and position**: the box's half-side (fraction of the shorter side) is named by
   the nearest size in log scale; the box centre by the nearest 3×3 grid cell.
6. **Shape**: analysis by synthesis — every candidate shape is rendered into the same box
   with the world's anti-aliased renderer and the one with the smallest L1 distance to
   the measured coverage wins (a template match on the shape's silhouette).

A clip (:func:`read_video`) is read frame by frame; objects are tracked by nearest box
centre, and the motion is named from the tracks: a colour that differs between the first
and last thirds is ``colour-change``; a box growing by 40% is ``growing``; a net
displacement over a quarter of the image is ``moving`` (direction from the dominant
axis); a vertical excursion over 0.15 that returns is ``bouncing``; otherwise ``still``.

Scoring: :func:`check_image` / :func:`check_video` compare a reading with ground truth
(a :class:`~tessera.modalities.world.visual.Scene`, or plain dicts with the attribute
names) and return the fraction of objects whose attribute is right, per attribute.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .visual import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, VideoScene, paint_shape

__all__ = [
    "ReadObject",
    "ImageReading",
    "ReadTrack",
    "VideoReading",
    "read_image",
    "read_video",
    "check_image",
    "check_video",
    "IMAGE_ATTRIBUTES",
    "VIDEO_ATTRIBUTES",
]

IMAGE_ATTRIBUTES = ("shape", "colour", "size", "position")
VIDEO_ATTRIBUTES = ("shape", "colour", "size", "position", "motion", "direction", "end_colour")
_FOREGROUND = 0.25  # RGB distance from the background that marks a pixel as object
_MIN_AREA_64 = 8  # smallest object in pixels at 64x64 (scaled with the image area)

_PALETTE = torch.tensor(list(COLOURS.values()))
_BG_PALETTE = torch.tensor(list(BACKGROUNDS.values()))
_SIZE_LOG = torch.tensor([math.log(v) for v in SIZES.values()])


@dataclass(frozen=True, kw_only=True)
class ReadObject:
    """One object as read from an image; ``x``, ``y``, ``radius`` as in ``VisualObject``."""

    shape: str
    colour: str
    size: str
    position: str
    x: float
    y: float
    radius: float
    area: int


@dataclass(frozen=True, kw_only=True)
class ImageReading:
    background: str
    objects: tuple[ReadObject, ...]


@dataclass(frozen=True, kw_only=True)
class ReadTrack:
    """One object followed through a clip."""

    shape: str
    colour: str
    end_colour: str
    size: str
    position: str
    motion: str
    direction: str | None


@dataclass(frozen=True, kw_only=True)
class VideoReading:
    background: str
    objects: tuple[ReadTrack, ...]


def _check_image_tensor(img: Any, who: str) -> Tensor:
    if not torch.is_tensor(img):
        raise ValueError(f"{who}: expected a float tensor (3, H, W) in [0, 1], got {type(img).__name__}")
    if img.ndim != 3 or img.shape[0] != 3 or min(img.shape[1:]) < 8:
        raise ValueError(
            f"{who}: image has shape {tuple(img.shape)}, expected (3, H, W) with H, W >= 8; "
            f"channels first (use img.permute(2, 0, 1) for HWC)"
        )
    if not img.is_floating_point():
        raise ValueError(f"{who}: image dtype is {img.dtype}; convert with img.float() / 255")
    if not torch.isfinite(img).all():
        raise ValueError(f"{who}: image has NaN/inf values; the checker needs a finite image")
    return img.detach().float().cpu().clamp(0.0, 1.0)


def _components(mask: Tensor) -> Tensor:
    """8-connected component labels of a boolean (H, W) mask (0 = background)."""
    H, W = mask.shape
    labels = torch.where(mask, torch.arange(1, H * W + 1, dtype=torch.float32).reshape(H, W), 0.0)
    while True:
        grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0]
        grown = torch.where(mask, grown, 0.0)
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def _nearest(palette: Tensor, rgb: Tensor, names: Sequence[str]) -> str:
    return names[int(((palette - rgb) ** 2).sum(1).argmin())]


def _read_background(img: Tensor) -> tuple[str, Tensor]:
    border = torch.cat([img[:, 0, :], img[:, -1, :], img[:, :, 0], img[:, :, -1]], dim=1)
    rgb = border.median(dim=1).values
    return _nearest(_BG_PALETTE, rgb, list(BACKGROUNDS)), rgb


def _fit_shape(alpha: Tensor, x: float, y: float, radius: float) -> str:
    """The shape whose rendering in the box (x, y, radius) best matches ``alpha``."""
    H, W = alpha.shape
    best, best_err = SHAPES[0], math.inf
    for shape in SHAPES:
        canvas = torch.zeros(3, H, W)
        paint_shape(canvas, shape, (1.0, 1.0, 1.0), x, y, radius)
        err = float((canvas[0] - alpha).abs().sum())
        if err < best_err:
            best, best_err = shape, err
    return best


def _read_object(img: Tensor, bg: Tensor, dist: Tensor, comp: Tensor) -> ReadObject:
    H, W = comp.shape
    # colour: the median of the interior (pixels at least 80% as far from the background as the farthest)
    d = dist[comp]
    core = img[:, comp][:, d >= 0.8 * d.max()]
    rgb = core.median(dim=1).values
    colour = _nearest(_PALETTE, rgb, list(COLOURS))
    # coverage: projection on the background -> object colour line, near the component only
    direction = rgb - bg
    alpha = (((img - bg[:, None, None]) * direction[:, None, None]).sum(0) / direction.pow(2).sum().clamp_min(1e-6))
    near = F.max_pool2d(comp.float()[None, None], 5, stride=1, padding=2)[0, 0] > 0
    alpha = torch.where(near, alpha.clamp(0.0, 1.0), 0.0)
    cols, rows = alpha.max(0).values, alpha.max(1).values
    width, height = float(cols.sum()), float(rows.sum())
    cx = float((cols * (torch.arange(W) + 0.5)).sum()) / max(width, 1e-6)
    cy = float((rows * (torch.arange(H) + 0.5)).sum()) / max(height, 1e-6)
    radius = max(width, height) / 2 / min(H, W)
    x, y = cx / W, cy / H
    size = list(SIZES)[int((_SIZE_LOG - math.log(max(radius, 1e-6))).abs().argmin())]
    cell = (min(2, max(0, round((x - 0.25) / 0.25))), min(2, max(0, round((y - 0.25) / 0.25))))
    position = next(p for p, cr in POSITIONS.items() if cr == cell)
    return ReadObject(
        shape=_fit_shape(alpha, x, y, radius),
        colour=colour,
        size=size,
        position=position,
        x=x,
        y=y,
        radius=radius,
        area=int(comp.sum()),
    )


def read_image(img: Tensor) -> ImageReading:
    """Read the background and every object of a visual-world image ``(3, H, W)``."""
    img = _check_image_tensor(img, "read_image")
    H, W = img.shape[1:]
    background, bg = _read_background(img)
    dist = (img - bg[:, None, None]).pow(2).sum(0).sqrt()
    labels = _components(dist > _FOREGROUND)
    min_area = max(2, round(_MIN_AREA_64 * H * W / 64**2))
    objects = []
    for label in labels.unique():
        if label == 0:
            continue
        comp = labels == label
        if int(comp.sum()) >= min_area:
            objects.append(_read_object(img, bg, dist, comp))
    objects.sort(key=lambda o: (o.y, o.x))
    return ImageReading(background=background, objects=tuple(objects))


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------
def _expected(attributes: Scene | VideoScene | Sequence[Any]) -> tuple[list[dict[str, Any]], str | None]:
    if isinstance(attributes, (Scene, VideoScene)):
        return [o.__dict__ for o in attributes.attributes], attributes.background
    objects = []
    for o in attributes:
        if isinstance(o, Mapping):
            objects.append(dict(o))
        elif hasattr(o, "__dict__"):
            objects.append(dict(o.__dict__))
        else:
            raise ValueError(
                f"attributes hold a {type(o).__name__}; give a Scene, or objects/dicts with "
                f"keys such as 'shape', 'colour', 'size', 'position'"
            )
    return objects, None


def _score(
    expected: list[dict[str, Any]], read: Sequence[Any], names: Sequence[str], background: str | None, got_bg: str
) -> dict[str, float]:
    """Per-attribute fraction of expected objects matched correctly, with the read objects
    assigned to the expected ones in the order that agrees best."""
    n = len(expected)
    if n == 0:
        raise ValueError("attributes list no objects; give at least one expected object")
    keys = [k for k in names if any(k in e for e in expected)]
    best: dict[str, float] | None = None
    for perm in itertools.permutations(range(len(read)), min(n, len(read))):
        hits = dict.fromkeys(keys, 0.0)
        for e, j in zip(expected, perm, strict=False):
            for k in keys:
                if k in e and e[k] == getattr(read[j], k):
                    hits[k] += 1.0 / n
        if best is None or sum(hits.values()) > sum(best.values()):
            best = hits
    out = best if best is not None else dict.fromkeys(keys, 0.0)
    out["count"] = float(len(read) == n)
    if background is not None:
        out["background"] = float(background == got_bg)
    out["all"] = float(all(v == 1.0 for v in out.values()))
    out["objects"] = float(len(read))  # after "all": a number of objects, not a score
    return out


def check_image(
    img: Tensor, attributes: Scene | Sequence[Any], *, background: str | None = None
) -> dict[str, float]:
    """Score ``img`` against its expected ``attributes`` (a ``Scene``, or objects/dicts with
    any of ``shape``, ``colour``, ``size``, ``position``). Returns the fraction of expected
    objects right per attribute, ``count`` (1.0 when the number of objects matches),
    ``background`` (when known), ``all`` (1.0 when everything is right) and ``objects``
    (how many were read: the best-matching ones are scored, so an image strewn with extra
    blobs can score by chance; :mod:`tessera.pipelines.evaluate` reports a strict figure)."""
    expected, scene_bg = _expected(attributes)
    reading = read_image(img)
    return _score(expected, reading.objects, IMAGE_ATTRIBUTES, background or scene_bg, reading.background)


# ---------------------------------------------------------------------------------------
# Videos
# ---------------------------------------------------------------------------------------
def _majority(values: Sequence[str]) -> str:
    return Counter(values).most_common(1)[0][0]


def _motion(track: list[ReadObject]) -> tuple[str, str | None, str, str]:
    third = max(1, len(track) // 3)
    start_colour = _majority([o.colour for o in track[:third]])
    end_colour = _majority([o.colour for o in track[-third:]])
    first, last = track[0], track[-1]
    dx, dy = last.x - first.x, last.y - first.y
    ys = [o.y for o in track]
    if start_colour != end_colour:
        return "colour-change", None, start_colour, end_colour
    if last.radius > 1.4 * first.radius:
        return "growing", None, start_colour, end_colour
    if max(abs(dx), abs(dy)) > 0.25:
        if abs(dx) >= abs(dy):
            return "moving", "right" if dx > 0 else "left", start_colour, end_colour
        return "moving", "down" if dy > 0 else "up", start_colour, end_colour
    if max(ys) - min(ys) > 0.15:
        return "bouncing", None, start_colour, end_colour
    return "still", None, start_colour, end_colour


def read_video(video: Tensor) -> VideoReading:
    """Read the background and every object's track of a clip ``(T, 3, H, W)``."""
    if not torch.is_tensor(video) or video.ndim != 4 or video.shape[0] < 2:
        shape = tuple(video.shape) if torch.is_tensor(video) else type(video).__name__
        raise ValueError(f"read_video: clip is {shape}, expected a float tensor (T, 3, H, W) with T >= 2")
    frames = [read_image(f) for f in video]
    count = _majority([str(len(f.objects)) for f in frames])
    n = int(count)
    if n == 0:
        return VideoReading(background=_majority([f.background for f in frames]), objects=())
    usable = [f for f in frames if len(f.objects) == n]
    tracks: list[list[ReadObject]] = [[o] for o in usable[0].objects]
    for f in usable[1:]:
        prev = [t[-1] for t in tracks]
        perm = min(
            itertools.permutations(range(n)),
            key=lambda p: sum((prev[i].x - f.objects[j].x) ** 2 + (prev[i].y - f.objects[j].y) ** 2 for i, j in enumerate(p)),
        )
        for i, j in enumerate(perm):
            tracks[i].append(f.objects[j])
    objects = []
    for track in tracks:
        motion, direction, colour, end_colour = _motion(track)
        objects.append(
            ReadTrack(
                shape=_majority([o.shape for o in track]),
                colour=colour,
                end_colour=end_colour,
                size=track[0].size,
                position=track[0].position,
                motion=motion,
                direction=direction,
            )
        )
    return VideoReading(background=_majority([f.background for f in frames]), objects=tuple(objects))


def check_video(
    video: Tensor, attributes: VideoScene | Sequence[Any], *, background: str | None = None
) -> dict[str, float]:
    """Score a clip against its expected ``attributes`` (a ``VideoScene``, or objects/dicts
    with any of ``shape``, ``colour``, ``position``, ``motion``, ``direction``,
    ``end_colour``); same keys and meaning as :func:`check_image`."""
    expected, scene_bg = _expected(attributes)
    for e in expected:  # only colour-change objects have an end colour; the rest keep theirs
        if e.get("end_colour") is None and "colour" in e:
            e["end_colour"] = e["colour"]
    reading = read_video(video)
    return _score(expected, reading.objects, VIDEO_ATTRIBUTES, background or scene_bg, reading.background)
