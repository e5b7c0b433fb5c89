"""Reading and writing clips: GIF through Pillow, MP4 (and other FFmpeg containers for
reading) through PyAV, which brings its own FFmpeg.

Canonical clip: float32 ``(T, 3, H, W)`` in [0, 1]. The policy that turns any file into
the tokenizer's clip of ``frames`` frames of ``size`` at ``fps``:

* **Frame rate**: the file is resampled in time to ``fps``. Model frame ``k`` shows the
  file's frame on screen at ``(k + 1/2) / fps`` seconds (the middle of the model frame's
  interval, so a GIF's centisecond-rounded delays never shift a frame). Every frame's
  time comes from the file (GIF delays, MP4 timestamps); a GIF frame without a delay
  lasts ``1 / fps``.
* **Frame count**: the first ``frames / fps`` seconds are used and later frames ignored.
  A file too short to cover ``(frames - 1/2) / fps`` seconds is refused with a
  :class:`VideoError` naming the file, its length and the rule (it is never padded).
* **Size**: each frame is converted to RGB (palette and alpha explicitly: transparent
  pixels over black), scaled so its shorter side is the model's side (Lanczos), then
  centre-cropped to ``size``.
* **Errors**: a missing, empty, corrupt or non-video file raises :class:`VideoError`
  (a ``ValueError``) naming the file.

Writing: GIF with ``1000 / fps`` ms delays, looping forever; MP4 as H.264 (yuv420p,
``crf`` 12, so colours survive a round trip to a few 1/255 levels) at ``fps``.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["VIDEO_EXTENSIONS", "READ_EXTENSIONS", "VideoError", "check_clip", "read_video", "write_video"]

VIDEO_EXTENSIONS = (".gif", ".mp4")
"""Formats the video tokenizer writes (and reads)."""
READ_EXTENSIONS = (".gif", ".mp4", ".mov", ".mkv", ".webm", ".avi")
"""Formats it reads (everything but GIF through PyAV)."""
MAX_SIDE = 8192


class VideoError(ValueError):
    """A clip (tensor or file) that the video tokenizer cannot use."""


def check_clip(media: object, *, frames: int, size: tuple[int, int], who: str = "clip") -> Tensor:
    """Validate canonical media: float ``(frames, 3, H, W)`` in [0, 1] with ``(H, W) == size``."""
    if not isinstance(media, Tensor):
        raise VideoError(
            f"{who} is a {type(media).__name__}; expected a float tensor (T, 3, H, W) in [0, 1] (use read())"
        )
    want = (frames, 3, *size)
    if media.ndim != 4 or tuple(media.shape) != want:
        raise VideoError(
            f"{who} has shape {tuple(media.shape)}; the video tokenizer takes exactly {want} "
            f"(frames, RGB, height, width); read files with read(), which resamples and crops to that"
        )
    if not media.is_floating_point():
        raise VideoError(
            f"{who} has dtype {media.dtype}; expected float values in [0, 1] (divide uint8 by 255)"
        )
    if not torch.isfinite(media).all():
        raise VideoError(f"{who} holds NaN or infinite values")
    lo, hi = float(media.min()), float(media.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise VideoError(
            f"{who} has values in [{lo:.3g}, {hi:.3g}]; expected [0, 1] (divide 8-bit pixels by 255)"
        )
    return media.float().clamp(0, 1)


def _to_rgb(img: object) -> object:
    """A Pillow frame → RGB: palette expanded, alpha composited over black."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def _fit(img: object, size: tuple[int, int]) -> Tensor:
    """Scale the shorter side to the model's, centre-crop to ``size`` → float (3, H, W)."""
    import numpy as np
    from PIL import Image

    H, W = size
    w, h = img.size
    scale = max(H / h, W / w)
    nw, nh = max(W, round(w * scale)), max(H, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - W) // 2, (nh - H) // 2
    img = img.crop((left, top, left + W, top + H))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def _gif_frames(path: Path, fps: float):
    """Yield (start time s, duration s, RGB Pillow frame) of a GIF."""
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        if im.format != "GIF":
            raise VideoError(f"{path}: a {im.format} file named .gif; save it as a GIF or rename it")
        t = 0.0
        for frame in ImageSequence.Iterator(im):
            delay = frame.info.get("duration") or 1000 / fps
            yield t, delay / 1000, _to_rgb(frame)
            t += delay / 1000


def _av_frames(path: Path, fps: float):
    """Yield (start time s, duration s, RGB Pillow frame) of the first video stream."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoError(f"{path}: the file holds no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or fps)
        t0 = None
        for frame in container.decode(stream):
            t = frame.time if frame.time is not None else (0.0 if t0 is None else t0 + 1 / rate)
            t0 = t if t0 is None else t0
            yield t - t0, 1 / rate, frame.to_image()


def read_video(path: str | os.PathLike, *, frames: int, size: tuple[int, int], fps: float) -> Tensor:
    """A GIF or video file → float32 ``(frames, 3, *size)`` in [0, 1], per the module's policy."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in READ_EXTENSIONS:
        raise VideoError(
            f"{path}: extension {ext!r} is not a video format the tokenizer reads; use one of {READ_EXTENSIONS}"
        )
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: the file is empty")
    times = [(k + 0.5) / fps for k in range(frames)]
    out: list[Tensor] = []
    end = 0.0
    source = _gif_frames(path, fps) if ext == ".gif" else _av_frames(path, fps)
    try:
        current = None
        for start, duration, img in source:
            if max(img.size) > MAX_SIDE:
                raise VideoError(
                    f"{path}: frames are {img.size[0]}x{img.size[1]}, larger than {MAX_SIDE} px a side"
                )
            while len(out) < frames and times[len(out)] < start:
                out.append(current)  # the previous frame is still on screen
            if len(out) == frames:
                break
            current, end = _fit(img, size), start + duration
        while len(out) < frames and current is not None and times[len(out)] < end:
            out.append(current)
    except VideoError:
        raise
    except Exception as e:  # Pillow and FFmpeg raise many types on corrupt input
        raise VideoError(
            f"{path}: not a readable video ({type(e).__name__}: {e}); the file is corrupt or not a {ext[1:]}"
        ) from e
    if len(out) < frames or any(f is None for f in out):
        raise VideoError(
            f"{path}: lasts {end:.3f} s; the video tokenizer needs {frames} frames at {fps:g} fps, i.e. a clip "
            f"covering at least {(frames - 0.5) / fps:.3f} s; it never pads a short clip — use a longer one"
        )
    return torch.stack(out)


def write_video(clip: Tensor, path: str | os.PathLike, *, fps: float, crf: int = 12) -> None:
    """Write float ``(T, 3, H, W)`` in [0, 1] as a GIF or an MP4 (H.264) at ``fps``."""
    from PIL import Image

    path = Path(path)
    ext = path.suffix.lower()
    if ext not in VIDEO_EXTENSIONS:
        raise VideoError(f"{path}: the tokenizer writes {VIDEO_EXTENSIONS}, not {ext!r}; pick one of those")
    if not isinstance(clip, Tensor) or clip.ndim != 4 or clip.shape[1] != 3 or clip.shape[0] < 1:
        shape = tuple(clip.shape) if isinstance(clip, Tensor) else type(clip).__name__
        raise VideoError(f"cannot write {shape} to {path}; expected a float tensor (T, 3, H, W) in [0, 1]")
    pixels = (clip.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).contiguous().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(p) for p in pixels]
    if ext == ".gif":
        images[0].save(
            path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, optimize=False
        )
        return
    import av

    H, W = pixels.shape[1:3]
    if H % 2 or W % 2:
        raise VideoError(f"{path}: H.264 needs even sides, the clip is {H}x{W}; crop or pad it to even sides")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": str(crf)}
        for img in images:
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
