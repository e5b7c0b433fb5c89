"""The built-in visual world: seeded, captioned images and videos of coloured shapes.

Tessera's embedded default data (see DESIGN.md, "The built-in world"): every sample is
drawn from a seed, carries its ground-truth attributes and a caption made from
templates, so a generated image or clip can be scored by
:mod:`tessera.modalities.world.checker`.

Vocabulary of the world:

* shapes: circle, square, triangle, star, cross, heart (every shape fills its bounding
  box, so the box centre is the object's position and the box side its size);
* colours: ten well-separated object colours, four backgrounds (an object never has the
  background's colour);
* sizes: small, medium, large (half-side 0.09 / 0.13 / 0.18 of the shorter image side,
  jittered by ±5%);
* positions: a 3×3 grid (centres at 0.25 / 0.5 / 0.75 of each side, jittered by ±0.02):
  top-left, top, top-right, left, centre, right, bottom-left, bottom, bottom-right;
* scenes of one or two objects; two objects sit two grid cells apart so they never touch;
* videos: the same objects ``moving`` (left/right/up/down), ``bouncing`` (a ball
  hopping twice), ``growing`` (small → large) or ``colour-change`` (switching colour
  half-way).

Rendering is anti-aliased (4×4 supersampling) and deterministic: the same scene renders to
the same bits on every machine. Sampling uses :class:`random.Random`, so the same seed
gives the same scene everywhere.

    scene = sample_image_scene(7)
    scene.caption            # 'a small red star in the top-left corner on a black background'
    img = render_image(scene, size=(64, 64))   # float32 (3, 64, 64) in [0, 1]
    clip = render_video(sample_video_scene(7), frames=16, size=(64, 64))  # (16, 3, 64, 64)
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SHAPES",
    "COLOURS",
    "BACKGROUNDS",
    "SIZES",
    "POSITIONS",
    "MOTIONS",
    "DIRECTIONS",
    "VisualObject",
    "Scene",
    "MovingObject",
    "VideoScene",
    "sample_image_scene",
    "sample_video_scene",
    "render_image",
    "render_video",
    "image_example",
    "video_example",
    "shape_coverage",
    "grid_centre",
    "paint_shape",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")

# Object colours (RGB in [0, 1]); the nearest pair is more than 0.35 apart.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.98, 0.92, 0.10),
    "green": (0.10, 0.70, 0.20),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.15, 0.30, 0.95),
    "purple": (0.55, 0.15, 0.80),
    "pink": (1.00, 0.55, 0.80),
    "brown": (0.50, 0.28, 0.08),
    "white": (0.97, 0.97, 0.97),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.05, 0.05, 0.05),
    "grey": (0.50, 0.50, 0.56),
    "navy": (0.07, 0.09, 0.30),
    "white": (0.97, 0.97, 0.97),
}
SIZES: dict[str, float] = {"small": 0.09, "medium": 0.13, "large": 0.18}
# name -> (column, row) in the 3x3 grid; the cell centre is 0.25 + 0.25 * index.
POSITIONS: dict[str, tuple[int, int]] = {
    "top-left": (0, 0),
    "top": (1, 0),
    "top-right": (2, 0),
    "left": (0, 1),
    "centre": (1, 1),
    "right": (2, 1),
    "bottom-left": (0, 2),
    "bottom": (1, 2),
    "bottom-right": (2, 2),
}
MOTIONS: tuple[str, ...] = ("moving", "bouncing", "growing", "colour-change")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

_WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
    "top-left": "in the top-left corner",
    "top-right": "in the top-right corner",
    "bottom-left": "in the bottom-left corner",
    "bottom-right": "in the bottom-right corner",
}
_DIRECTION_PHRASE = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
_POSITION_JITTER = 0.02
_SIZE_JITTER = 0.05
_SUPERSAMPLE = 4


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def grid_centre(position: str) -> tuple[float, float]:
    """Normalised (x, y) of a position's grid cell centre (x right, y down)."""
    col, row = POSITIONS[position]
    return 0.25 + 0.25 * col, 0.25 + 0.25 * row


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class VisualObject:
    """One object of an image scene: its names, and its exact geometry in normalised
    coordinates (``x``, ``y`` in [0, 1] of width/height; ``radius`` = half the box side
    as a fraction of the shorter image side)."""

    shape: str
    colour: str
    size: str
    position: str
    x: float
    y: float
    radius: float

    @property
    def phrase(self) -> str:
        """``'small red circle'`` (no article)."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True, kw_only=True)
class Scene:
    """A captioned image scene: ``attributes`` holds one :class:`VisualObject` per object."""

    seed: int
    background: str
    attributes: tuple[VisualObject, ...]
    caption: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "background": self.background,
            "objects": [asdict(o) for o in self.attributes],
            "caption": self.caption,
        }


def _two_cells_apart(a: str, b: str) -> bool:
    (ca, ra), (cb, rb) = POSITIONS[a], POSITIONS[b]
    return max(abs(ca - cb), abs(ra - rb)) == 2


def _sample_object(rng: random.Random, background: str, position: str, size: str | None = None) -> VisualObject:
    colours = [c for c in COLOURS if c != background]
    size = size or rng.choice(list(SIZES))
    cx, cy = grid_centre(position)
    return VisualObject(
        shape=rng.choice(SHAPES),
        colour=rng.choice(colours),
        size=size,
        position=position,
        x=cx + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER),
        y=cy + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER),
        radius=SIZES[size] * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER),
    )


def _image_caption(rng: random.Random, objects: tuple[VisualObject, ...], background: str) -> str:
    parts = [f"a {o.phrase} {_WHERE[o.position]}" for o in objects]
    things = " and ".join(parts)
    templates = (
        "{things}, on a {bg} background",
        "a {bg} background with {things}",
        "{things}; the background is {bg}",
    )
    return rng.choice(templates).format(things=things, bg=background)


def sample_image_scene(seed: int, *, max_objects: int = 2) -> Scene:
    """The image scene of ``seed``: one or two objects (two with probability 0.4 when
    ``max_objects`` is 2) on a plain background, with its caption."""
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects={max_objects}; the visual world draws scenes of 1 or 2 objects")
    rng = random.Random(f"image-{int(seed)}")
    background = rng.choice(list(BACKGROUNDS))
    n = 2 if max_objects == 2 and rng.random() < 0.4 else 1
    first = rng.choice([p for p in POSITIONS if n == 1 or p != "centre"])
    positions = [first]
    if n == 2:
        positions.append(rng.choice([p for p in POSITIONS if _two_cells_apart(first, p)]))
    objects = tuple(_sample_object(rng, background, p) for p in positions)
    return Scene(seed=int(seed), background=background, attributes=objects, caption=_image_caption(rng, objects, background))


# ---- shape geometry ---------------------------------------------------------------------
def _fit_box(points: list[tuple[float, float]]) -> Tensor:
    """Scale a polygon so its bounding box is exactly [-1, 1]²."""
    p = torch.tensor(points, dtype=torch.float64)
    lo, hi = p.min(0).values, p.max(0).values
    return ((p - (lo + hi) / 2) / ((hi - lo) / 2)).float()


def _star(points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        a = -math.pi / 2 + k * math.pi / points
        r = 1.0 if k % 2 == 0 else inner
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _heart(n: int = 96) -> list[tuple[float, float]]:
    # the classic parametric heart, y flipped so the point is at the bottom (y down)
    out = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        out.append((x, -y))
    return out


_ARM = 0.34  # half-width of the cross's arms
_POLYGONS: dict[str, Tensor] = {
    "square": _fit_box([(-1, -1), (1, -1), (1, 1), (-1, 1)]),
    "triangle": _fit_box([(0, -1), (1, 1), (-1, 1)]),
    "star": _fit_box(_star()),
    "cross": _fit_box(
        [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM),
         (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)]
    ),
    "heart": _fit_box(_heart()),
}


def shape_coverage(shape: str, x: Tensor, y: Tensor) -> Tensor:
    """Boolean inside-test of ``shape`` (box [-1, 1]², x right, y down) at points ``x, y``."""
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape not in _POLYGONS:
        raise ValueError(f"shape {shape!r} is not in the visual world; use one of {SHAPES}")
    poly = _POLYGONS[shape]
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = poly.roll(-1, 0)[:, 0], poly.roll(-1, 0)[:, 1]
    px, py = x.reshape(-1, 1), y.reshape(-1, 1)
    straddles = (y1 > py) != (y2 > py)
    x_cross = (x2 - x1) * (py - y1) / torch.where(y2 == y1, torch.ones_like(y1), y2 - y1) + x1
    crossings = (straddles & (px < x_cross)).sum(1)
    return (crossings % 2 == 1).reshape(x.shape)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) < 8 or int(s) > 4096 for s in size):
        raise ValueError(f"size={size}; give (height, width) with each side in [8, 4096], e.g. (64, 64)")
    return int(size[0]), int(size[1])


def paint_shape(img: Tensor, shape: str, colour: tuple[float, float, float], x: float, y: float, radius: float) -> None:
    """Composite one anti-aliased shape onto ``img`` (3, H, W) in place."""
    _, H, W = img.shape
    R = radius * min(H, W)
    px, py = x * W, y * H
    x0, x1 = max(0, math.floor(px - R) - 1), min(W, math.ceil(px + R) + 1)
    y0, y1 = max(0, math.floor(py - R) - 1), min(H, math.ceil(py + R) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    S = _SUPERSAMPLE
    sub = (torch.arange(S, dtype=torch.float32) + 0.5) / S
    xs = (torch.arange(x0, x1, dtype=torch.float32)[:, None] + sub).reshape(-1)
    ys = (torch.arange(y0, y1, dtype=torch.float32)[:, None] + sub).reshape(-1)
    gy, gx = torch.meshgrid((ys - py) / R, (xs - px) / R, indexing="ij")
    inside = shape_coverage(shape, gx, gy).float()
    cover = inside.reshape(y1 - y0, S, x1 - x0, S).mean((1, 3))
    c = torch.tensor(colour, dtype=torch.float32)[:, None, None]
    region = img[:, y0:y1, x0:x1]
    img[:, y0:y1, x0:x1] = region + cover * (c - region)


def render_image(scene: Scene, size: tuple[int, int] = (64, 64)) -> Tensor:
    """Draw ``scene`` as float32 ``(3, H, W)`` in [0, 1]; ``size`` is (height, width)."""
    H, W = _check_size(size)
    img = torch.tensor(BACKGROUNDS[scene.background], dtype=torch.float32)[:, None, None].repeat(1, H, W)
    for o in scene.attributes:
        paint_shape(img, o.shape, COLOURS[o.colour], o.x, o.y, o.radius)
    return img.clamp_(0.0, 1.0)


def image_example(seed: int, size: tuple[int, int] = (64, 64)) -> Tensor:
    """The rendered image of ``sample_image_scene(seed)``."""
    return render_image(sample_image_scene(seed), size=size)


# ---------------------------------------------------------------------------------------
# Videos
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class MovingObject:
    """One object of a video scene. ``position`` names where it starts; ``direction`` is
    set for ``moving``; ``end_colour`` for ``colour-change``; ``size`` is the start size
    (``growing`` objects end ``large``). Geometry: start ``(x0, y0, r0)`` and end
    ``(x1, y1, r1)``; a bouncing object hops ``bounce`` (fraction of the height) twice."""

    shape: str
    colour: str
    size: str
    position: str
    motion: str
    direction: str | None
    end_colour: str | None
    x0: float
    y0: float
    r0: float
    x1: float
    y1: float
    r1: float
    bounce: float = 0.0

    def state(self, t: float) -> tuple[float, float, float, str]:
        """(x, y, radius, colour name) at time ``t`` in [0, 1]."""
        x = self.x0 + (self.x1 - self.x0) * t
        y = self.y0 + (self.y1 - self.y0) * t
        r = self.r0 + (self.r1 - self.r0) * t
        if self.motion == "bouncing":
            y -= self.bounce * abs(math.sin(2 * math.pi * t))
        colour = self.end_colour if self.motion == "colour-change" and t >= 0.5 else self.colour
        return x, y, r, colour

    @property
    def phrase(self) -> str:
        """``'small red circle moving to the right'`` (no article)."""
        what = f"{self.size} {self.colour} {self.shape}"
        if self.motion == "moving":
            return f"{what} moving {_DIRECTION_PHRASE[self.direction]}"
        if self.motion == "bouncing":
            column = ("left", "centre", "right")[POSITIONS[self.position][0]]
            return f"{what} bouncing {_WHERE[column]}"
        if self.motion == "growing":
            return f"{self.colour} {self.shape} growing {_WHERE[self.position]}"
        return f"{self.size} {self.shape} {_WHERE[self.position]} changing from {self.colour} to {self.end_colour}"


@dataclass(frozen=True, kw_only=True)
class VideoScene:
    """A captioned video scene: ``attributes`` holds one :class:`MovingObject` per object."""

    seed: int
    background: str
    attributes: tuple[MovingObject, ...]
    caption: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "background": self.background,
            "objects": [asdict(o) for o in self.attributes],
            "caption": self.caption,
        }


def _sample_moving_object(rng: random.Random, background: str, column: int | None) -> MovingObject:
    """One moving object; ``column`` (0 or 2) pins it to a side column for two-object
    clips, where only vertical and in-place motions keep the objects apart."""
    colours = [c for c in COLOURS if c != background]
    motion = rng.choice(MOTIONS)
    shape, colour = rng.choice(SHAPES), rng.choice(colours)
    size = "small" if motion == "growing" else rng.choice(("small", "medium") if column is not None else tuple(SIZES))
    r0 = SIZES[size] * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER)
    r1, direction, end_colour, bounce = r0, None, None, 0.0
    jx, jy = (rng.uniform(-_POSITION_JITTER, _POSITION_JITTER) for _ in range(2))
    col = column if column is not None else rng.randrange(3)
    if motion == "moving":
        direction = rng.choice(DIRECTIONS if column is None else ("up", "down"))
        lane = rng.randrange(3)
        if direction in ("left", "right"):
            c0, c1, r_0, r_1 = (0, 2, lane, lane) if direction == "right" else (2, 0, lane, lane)
        else:
            c0, c1, r_0, r_1 = (col, col, 0, 2) if direction == "down" else (col, col, 2, 0)
    elif motion == "bouncing":
        c0 = c1 = col
        r_0 = r_1 = 2
        bounce = 0.42
    else:
        c0 = c1 = col
        r_0 = r_1 = rng.randrange(3) if column is None or motion != "growing" else 1
        if motion == "growing":
            r1 = SIZES["large"] * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER)
        else:
            end_colour = rng.choice([c for c in colours if c != colour])
    position = next(p for p, cr in POSITIONS.items() if cr == (c0, r_0))
    return MovingObject(
        shape=shape,
        colour=colour,
        size=size,
        position=position,
        motion=motion,
        direction=direction,
        end_colour=end_colour,
        x0=0.25 + 0.25 * c0 + jx,
        y0=0.25 + 0.25 * r_0 + jy,
        r0=r0,
        x1=0.25 + 0.25 * c1 + jx,
        y1=0.25 + 0.25 * r_1 + jy,
        r1=r1,
        bounce=bounce,
    )


def sample_video_scene(seed: int, *, max_objects: int = 2) -> VideoScene:
    """The video scene of ``seed``: one object with any motion, or (probability 0.3) two
    objects in the left and right columns with vertical or in-place motions."""
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects={max_objects}; the visual world draws clips of 1 or 2 objects")
    rng = random.Random(f"video-{int(seed)}")
    background = rng.choice(list(BACKGROUNDS))
    if max_objects == 2 and rng.random() < 0.3:
        objects = tuple(_sample_moving_object(rng, background, col) for col in (0, 2))
    else:
        objects = (_sample_moving_object(rng, background, None),)
    things = " and ".join(f"{_article(o.phrase)} {o.phrase}" for o in objects)
    template = rng.choice(("{things}, on a {bg} background", "a {bg} background with {things}"))
    return VideoScene(
        seed=int(seed), background=background, attributes=objects, caption=template.format(things=things, bg=background)
    )


def render_video(scene: VideoScene, frames: int = 16, size: tuple[int, int] = (64, 64)) -> Tensor:
    """Draw ``scene`` as float32 ``(T, 3, H, W)`` in [0, 1]; frame ``k`` shows time
    ``k / (T - 1)`` of every object's motion."""
    if int(frames) < 2:
        raise ValueError(f"frames={frames}; a clip needs at least 2 frames (e.g. 16)")
    H, W = _check_size(size)
    bg = torch.tensor(BACKGROUNDS[scene.background], dtype=torch.float32)[:, None, None]
    out = torch.empty(int(frames), 3, H, W)
    for k in range(int(frames)):
        t = k / (int(frames) - 1)
        img = bg.repeat(1, H, W)
        for o in scene.attributes:
            x, y, r, colour = o.state(t)
            paint_shape(img, o.shape, COLOURS[colour], x, y, r)
        out[k] = img.clamp_(0.0, 1.0)
    return out


def video_example(seed: int, frames: int = 16, size: tuple[int, int] = (64, 64)) -> Tensor:
    """The rendered clip of ``sample_video_scene(seed)``."""
    return render_video(sample_video_scene(seed), frames=frames, size=size)
