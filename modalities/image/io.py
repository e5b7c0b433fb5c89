"""Reading and writing images with Pillow, and the explicit resize/crop policy.

Reading (:func:`load_image`) turns PNG, JPEG, WebP and GIF (first frame) files into the
canonical image, ``float32 (3, H, W)`` in [0, 1]:

* the file must exist, be non-empty, at most ``MAX_FILE_BYTES`` and at most
  ``MAX_PIXELS`` pixels (checked from the header, before decoding);
* EXIF orientation is applied (``ImageOps.exif_transpose``), so a portrait phone photo
  comes out upright;
* modes are converted explicitly: RGB as is; ``L``/``1`` replicated to three channels;
  16- and 32-bit grayscale (``I;16``, ``I``) scaled by 65535; palette, CMYK and YCbCr
  through Pillow's RGB conversion; anything with transparency (``RGBA``, ``LA``, ``PA``,
  palette with a transparent index) composited onto **white**;
* corrupt, truncated or unsupported files raise :class:`ImageFileError` (a
  ``ValueError``) naming the file.

Fitting (:func:`fit_image`) is what the tokenizer's ``read`` applies, never ``encode``:
scale (antialiased bilinear, aspect ratio kept) so the **shorter side** equals the target
side, cap the longer side at ``max_side`` by centre-cropping, then centre-crop each side
down to a multiple of the tokenizer's downsampling factor (fewer than ``factor`` pixels).

Writing (:func:`save_image`) picks the format from the extension (``.png``, ``.jpg``/
``.jpeg`` at quality 95, ``.webp`` lossless, ``.gif``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "ImageFileError",
    "IMAGE_EXTENSIONS",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "load_image",
    "fit_image",
    "save_image",
    "check_image_tensor",
    "to_pil",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif")
MAX_FILE_BYTES = 200 * 2**20
MAX_PIXELS = 40_000_000


class ImageFileError(ValueError):
    """An image file that cannot be read: missing data, corrupt, truncated or too large."""


def check_image_tensor(img: object, who: str) -> Tensor:
    """Validate a canonical image: a float tensor ``(3, H, W)``, finite, in [0, 1]."""
    if not torch.is_tensor(img):
        raise ValueError(f"{who}: expected a float32 tensor (3, H, W) in [0, 1], got {type(img).__name__}")
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(
            f"{who}: image has shape {tuple(img.shape)}, expected (3, H, W) (RGB, channels first); "
            f"use img.permute(2, 0, 1) for (H, W, 3) and img.expand(3, -1, -1) for grayscale (1, H, W)"
        )
    if not img.is_floating_point():
        raise ValueError(f"{who}: image dtype is {img.dtype}, expected float; use img.float() / 255 for uint8")
    if not torch.isfinite(img).all():
        raise ValueError(f"{who}: image has {int((~torch.isfinite(img)).sum())} NaN/inf values; fix the source")
    lo, hi = float(img.min()), float(img.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{who}: image values span [{lo:.3g}, {hi:.3g}], expected [0, 1]; rescale (e.g. img / 255) "
            f"or clamp with img.clamp(0, 1)"
        )
    return img.float()


def load_image(path: str | os.PathLike) -> Tensor:
    """Read an image file into ``float32 (3, H, W)`` in [0, 1] (see the module docstring)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    nbytes = path.stat().st_size
    if nbytes == 0:
        raise ImageFileError(f"{path}: the file is empty (0 bytes); it is not an image")
    if nbytes > MAX_FILE_BYTES:
        raise ImageFileError(
            f"{path}: the file is {nbytes / 2**20:.0f} MiB, over the {MAX_FILE_BYTES // 2**20} MiB limit "
            f"for one image; downscale it first"
        )
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageFileError(
                    f"{path}: {w}x{h} = {w * h / 1e6:.0f} megapixels, over the {MAX_PIXELS / 1e6:.0f} "
                    f"megapixel limit; downscale it first"
                )
            im.seek(0)  # GIF / animated WebP: the first frame
            im.load()
            im = ImageOps.exif_transpose(im)
            array = _to_rgb_array(im, path)
    except ImageFileError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageFileError(f"{path}: over Pillow's decompression-bomb megapixel limit ({e}); downscale it first") from e
    except UnidentifiedImageError as e:
        raise ImageFileError(f"{path}: not a readable image (corrupt or unsupported format: {e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageFileError(f"{path}: the image data is corrupt or truncated ({e})") from e
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _to_rgb_array(im: PILImage, path: Path) -> np.ndarray:
    """A Pillow image in any supported mode → float32 (H, W, 3) in [0, 1]."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = np.asarray(im, dtype=np.float32) / 65535.0
        return np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=2)
    if mode == "F":
        raise ImageFileError(f"{path}: 32-bit float images (mode F) have no fixed range; convert to 8/16-bit first")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:4]
        return rgba[..., :3] * alpha + (1.0 - alpha)  # composite onto white
    if mode not in ("RGB", "L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        raise ImageFileError(f"{path}: unsupported image mode {mode!r}; convert the file to RGB")
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def fit_image(img: Tensor, *, side: int, multiple: int, max_side: int) -> Tensor:
    """Resize so the shorter side is ``side`` (aspect kept), centre-crop the longer side to
    at most ``max_side``, then centre-crop both sides to a multiple of ``multiple``."""
    img = check_image_tensor(img, "fit_image")
    _, H, W = img.shape
    scale = side / min(H, W)
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    if (h, w) != (H, W):
        img = F.interpolate(img[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
    th = min(h, max_side) // multiple * multiple
    tw = min(w, max_side) // multiple * multiple
    if th < multiple or tw < multiple:
        raise ValueError(f"fit_image: {H}x{W} resized to {h}x{w} is smaller than one {multiple}x{multiple} token")
    top, left = (h - th) // 2, (w - tw) // 2
    return img[:, top : top + th, left : left + tw].clamp(0.0, 1.0).contiguous()


def to_pil(img: Tensor) -> PILImage:
    """Canonical image → ``PIL.Image`` (RGB, 8 bit, rounded)."""
    from PIL import Image

    img = check_image_tensor(img, "to_pil")
    array = (img.permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


def save_image(img: Tensor, path: str | os.PathLike) -> None:
    """Write a canonical image; the format follows the extension (see module docstring)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"{path}: extension {ext!r} is not one of {IMAGE_EXTENSIONS}; pick one of those")
    pil = to_pil(img)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {".jpg": {"quality": 95}, ".jpeg": {"quality": 95}, ".webp": {"lossless": True}}.get(ext, {})
    pil.save(path, **options)
