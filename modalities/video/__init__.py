"""The video tokenizer plugin: clips ↔ ids through one of two networks.

``VideoTokenizer`` (registered as ``"video"``, media kind ``"video"``) turns a clip —
float32 ``(9, 3, 64, 64)`` in [0, 1], 9 frames at 8 fps — into ids and back:

* **keyframe** (the shipped checkpoint, :mod:`.keyframe`): frame 0 through the image
  tokenizer (16 × 16 ids of its 1024 codes), frames 1–8 as 4 × 8 × 8 motion ids (512 VQ
  codes) that move the keyframe's blocks: 512 ids of 1536 codes, 28.75 dB held-out;
* **causal** (:class:`~.model.VideoAutoencoder`, the dataclass default): a causal
  spatio-temporal autoencoder after MAGVIT-v2 (Yu et al. 2023), the first frame alone then
  pairs of frames, 5 × 8 × 8 = 320 ids of 1000 FSQ codes, 22.8 dB.

Token layout: ``"fixed"`` (512 or 320 steps of one token). For the keyframe design the
keyframe ids come first (row by row), then the motion ids (pair by pair, row by row), and
each part only takes its own codes (the layout's ``parts``: the decoding grammar keeps a
generated clip to them, and :meth:`decode` names a position that breaks the rule). The
clip size is fixed rather than carried in ``"grid"`` meta tokens because every clip is
brought to the model's size by :meth:`VideoTokenizer.read` (time resampled to 8 fps, first
9 frames, shorter side scaled and centre-cropped — see :mod:`.io`), so meta tokens would
cost tokens the LLM could only get wrong; a future tokenizer for several clip sizes would
switch to ``"grid"`` with (frames, height, width) meta fields.

    tok = VideoTokenizer.pretrained()            # the shipped checkpoint in weights/
    ids = tok.encode(tok.read("clip.mp4"))        # 512 local ids
    tok.write(tok.decode(ids), "again.gif")

Training recipe: :mod:`.train`; command line: :mod:`.cli`; figures: weights/README.md.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from ...core.checkpoint import sha256_tensors
from ...core.registry import register_modality
from ...core.spec import ModalitySpec, TokenLayout
from ...core.tokenizer_files import (
    half_precision_state,
    load_weights,
    pretrained_folder,
    read_tokenizer_folder,
    save_tokenizer_folder,
)
from .io import VIDEO_EXTENSIONS, VideoError, check_clip, read_video, write_video
from .model import VideoTokenizerConfig, build_video_model

__all__ = ["VideoTokenizer", "VideoTokenizerConfig", "VideoError", "WEIGHTS_DIR"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
"""The shipped checkpoint (reproduce with the command in weights/README.md)."""

_FORMAT_VERSION = "1"


@register_modality
class VideoTokenizer:
    """Clips ↔ local ids through the keyframe or the causal network (see the module docstring)."""

    name: ClassVar[str] = "video"
    media_kind: ClassVar[str] = "video"
    file_extensions: ClassVar[tuple[str, ...]] = VIDEO_EXTENSIONS

    def __init__(
        self, config: VideoTokenizerConfig | None = None, model: torch.nn.Module | None = None
    ) -> None:
        self.config = config or (model.config if model is not None else VideoTokenizerConfig())
        self.model = (model or build_video_model(self.config)).eval()

    # ---- the contract --------------------------------------------------------
    @property
    def layout(self) -> TokenLayout:
        c, parts = self.config, ()
        if c.design == "keyframe":  # keyframe ids take the image codes, motion ids the rest
            n_key, k_key = math.prod(c.keyframe_grid), self.model.keyframe_codes
            parts = ((n_key, 0, k_key), (c.tokens - n_key, k_key, self.model.codebook_size))
        return TokenLayout(kind="fixed", levels=(self.model.codebook_size,), steps=c.tokens, parts=parts)

    @property
    def spec(self) -> ModalitySpec:
        c = self.config
        extra = {"frames": c.frames, "fps": c.fps, "size": list(c.size), "grid": list(c.grid)}
        if c.design == "keyframe":  # (the causal design's spec predates these keys and keeps its old form)
            extra |= {"design": c.design, "keyframe_grid": list(c.keyframe_grid)}
        return ModalitySpec(
            name=self.name,
            version=_FORMAT_VERSION,
            media_kind=self.media_kind,
            layout=self.layout,
            fingerprint=sha256_tensors(self.model.state_dict()),
            extra=extra,
        )

    def encode(self, media: Tensor) -> Tensor:
        """float32 ``(frames, 3, H, W)`` in [0, 1] → 1-D local ids (``tokens`` of them)."""
        clip = check_clip(media, frames=self.config.frames, size=self.config.size)
        return self.layout.flatten(self.model.encode_codes(clip[None]).reshape(-1))

    def decode(self, ids: Tensor) -> Tensor:
        """Local ids → float32 clip ``(frames, 3, H, W)`` in [0, 1]."""
        _, codes = self.layout.unflatten(ids)
        return self.model.decode_codes(codes.reshape(1, *self.model.code_shape))[0].clamp(0, 1)

    def read(self, path: str | os.PathLike) -> Tensor:
        c = self.config
        return read_video(path, frames=c.frames, size=c.size, fps=c.fps)

    def write(self, media: Tensor, path: str | os.PathLike) -> None:
        write_video(media, path, fps=self.config.fps)

    def save(self, path: str | os.PathLike, *, half: bool = False) -> None:
        """Write ``path/config.json`` + ``model.safetensors``. ``half=True`` stores the
        weights in fp16 (half the file; the shipped checkpoint) after rounding this
        tokenizer's own weights to fp16 values, so it encodes exactly as the saved copy; the
        keyframe design's image tokenizer stays fp32 (frame 0 is coded exactly as by it)."""
        keep = ("keyframe.",) if self.config.design == "keyframe" else ()
        state = half_precision_state(self.model, keep=keep) if half else self.model.state_dict()
        save_tokenizer_folder(
            path, state=state, config_key="model", config=self.config.to_dict(),
            spec=self.spec, format_version=_FORMAT_VERSION,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> VideoTokenizer:
        raw, state = read_tokenizer_folder(path, config_key="model", format_version=_FORMAT_VERSION)
        config = VideoTokenizerConfig.from_dict(raw)
        return cls(config, load_weights(build_video_model(config), state, path))

    @classmethod
    def pretrained(cls) -> VideoTokenizer:
        """The checkpoint shipped in :data:`WEIGHTS_DIR`."""
        return cls.load(pretrained_folder(WEIGHTS_DIR, modality="video", hint="train one (see weights/README.md)"))

    @classmethod
    def debug(cls) -> VideoTokenizer:
        torch.manual_seed(0)
        return cls(VideoTokenizerConfig.debug())

    def example(self, seed: int) -> Tensor:
        """Built-in world clip ``seed`` at the tokenizer's frames and size."""
        from ..world.visual import render_video, sample_video_scene

        return render_video(sample_video_scene(seed), frames=self.config.frames, size=self.config.size)

    def __repr__(self) -> str:
        c = self.config
        t, h, w = c.grid
        grid = f"{t}x{h}x{w}"
        if c.design == "keyframe":
            grid = f"keyframe {c.keyframe_grid[0]}x{c.keyframe_grid[1]} + motion {grid}"
        return (
            f"VideoTokenizer({c.frames} frames of {c.size[0]}x{c.size[1]} at {c.fps:g} fps -> {grid} = "
            f"{c.tokens} tokens of {self.model.codebook_size} codes)"
        )
