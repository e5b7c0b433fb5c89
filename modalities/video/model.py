"""The video tokenizer's network: a causal spatio-temporal convolutional autoencoder with
any Tessera quantizer as its bottleneck. The causal layout follows MAGVIT-v2 (Yu et al.
2023, "Language Model Beats Diffusion — Tokenizer is Key to Visual Generation"): every
3D convolution pads only on the past side in time, and the first frame is encoded on its
own, so a clip's first latent frame is an image token grid and latent frame ``t`` never
sees a frame after ``time_factor * t``.

Shapes, for the default configuration (9 frames of 64×64, time /2, space /8):

    clip (B, 9, 3, 64, 64) in [0, 1]
      -> repeat frame 0 once in front              (B, 3, 10, 64, 64)
      -> space-time unshuffle (2, 8, 8)            (B, 384, 5, 8, 8)    latent frame 0 = frame 0 alone
      -> 1×1×1 conv, causal ResBlocks (2×3×3)      (B, 96, 5, 8, 8)
      -> LayerNorm, SiLU, 1×1×1 conv               (B, 4, 5, 8, 8)
      -> FSQ (8, 5, 5, 5), channel-last            indices (B, 5, 8, 8) = 320 tokens of 1000 codes
      -> decoder (mirror)                          (B, 384, 5, 8, 8)
      -> space-time shuffle, drop the repeat       (B, 9, 3, 64, 64)

``channels`` with more than one entry adds stride-(1, 2, 2) causal convolutions between
levels (and nearest upsampling in the decoder), for larger clips.

Why this budget: 9 frames (about 1.1 s at 8 fps, enough for the world's motions to be
read back by the checker) × 64×64 at time /2 and space /8 is 5 × 8 × 8 = 320 tokens,
inside the 512-token clip budget with room for a caption. Time /4 would leave only 3
latent frames (a bounce is lost); space /4 would cost 1280 tokens.

Grouping frames and pixels by space-time unshuffle (rather than strided convolutions at
full resolution) runs every convolution on the 5 × 8 × 8 grid, which is what makes
training on two shared CPU cores affordable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ...core.quantizers import FSQ, Quantizer, QuantizerOutput
from ...core.quantizers.vq import VectorQuantizer
from ..image.model import ImageTokenizerConfig

__all__ = [
    "VideoTokenizerConfig",
    "CausalConv3d",
    "VideoAutoencoder",
    "build_quantizer",
    "build_video_model",
    "space_time_unshuffle",
    "space_time_shuffle",
]

QuantizerKind = Literal["fsq", "vq"]
Design = Literal["causal", "keyframe"]


@dataclass(frozen=True, kw_only=True)
class VideoTokenizerConfig:
    """Everything that defines a video tokenizer (JSON-serialisable).

    A clip is ``frames`` frames of ``size`` (height, width) at ``fps`` frames per second;
    ``frames - 1`` must be a multiple of ``time_factor`` (the first frame is encoded
    alone). Space is reduced by ``patch`` (space-time unshuffle) and then by 2 per extra
    entry of ``channels``: ``space_factor = patch * 2 ** (len(channels) - 1)``. The token
    grid is ``latent_frames × (H / space_factor) × (W / space_factor)``, one token each.
    ``quantizer`` is ``"fsq"`` (``levels``) or ``"vq"`` (a
    :class:`~tessera.core.quantizers.vq.VectorQuantizer` of ``codebook_size`` codes,
    ``quantizer_options`` passed through).
    """

    frames: int = 9
    size: tuple[int, int] = (64, 64)
    fps: float = 8.0
    time_factor: int = 2
    patch: int = 8
    channels: tuple[int, ...] = (96,)
    blocks: int = 1
    kernel: tuple[int, int, int] = (2, 3, 3)
    latent_dim: int = 4
    quantizer: QuantizerKind = "fsq"
    levels: tuple[int, ...] = (8, 5, 5, 5)
    codebook_size: int = 1000
    quantizer_options: dict[str, Any] = field(default_factory=dict)
    design: Design = "causal"
    keyframe: dict[str, Any] | None = None
    search_radius: int = 8

    def __post_init__(self) -> None:
        who = "VideoTokenizerConfig"
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "levels", tuple(int(v) for v in self.levels))
        if self.time_factor < 1 or (self.frames - 1) % self.time_factor or self.frames < 1 + self.time_factor:
            raise ValueError(
                f"{who}: frames={self.frames} with time_factor={self.time_factor}; frames - 1 must be a positive "
                f"multiple of time_factor (the first frame is encoded alone), e.g. frames=9, time_factor=2"
            )
        if self.patch < 1 or not self.channels:
            raise ValueError(
                f"{who}: patch={self.patch}, channels={self.channels}; need patch >= 1 and one channel level"
            )
        f = self.space_factor
        if any(s % f for s in self.size):
            raise ValueError(
                f"{who}: size={self.size} must be divisible by the space factor {f} on both sides"
            )
        object.__setattr__(self, "kernel", tuple(int(k) for k in self.kernel))
        if (
            len(self.kernel) != 3
            or min(self.kernel) < 1
            or self.kernel[1] % 2 == 0
            or self.kernel[2] % 2 == 0
        ):
            raise ValueError(
                f"{who}: kernel={self.kernel}; give (time, height, width) with odd spatial sides, e.g. (2, 3, 3)"
            )
        if self.quantizer not in ("fsq", "vq"):
            raise ValueError(f"{who}: quantizer={self.quantizer!r}; use 'fsq' or 'vq'")
        if self.quantizer == "fsq":
            if len(self.levels) != self.latent_dim or math.prod(self.levels) != self.codebook_size:
                raise ValueError(
                    f"{who}: FSQ levels={self.levels} need latent_dim={len(self.levels)} and "
                    f"codebook_size={math.prod(self.levels)} (got {self.latent_dim}, {self.codebook_size})"
                )
        if self.fps <= 0:
            raise ValueError(f"{who}: fps={self.fps} must be > 0")
        if self.design not in ("causal", "keyframe"):
            raise ValueError(f"{who}: design={self.design!r}; use 'causal' or 'keyframe'")
        if (self.design == "keyframe") != (self.keyframe is not None):
            raise ValueError(
                f"{who}: design={self.design!r} with keyframe={'set' if self.keyframe else None}; the keyframe "
                f"design needs keyframe= (an image tokenizer configuration, e.g. the shipped image "
                f"tokenizer's) and the causal design takes none"
            )
        if self.design == "keyframe":
            self._check_keyframe(who)

    def _check_keyframe(self, who: str) -> None:
        image = ImageTokenizerConfig.from_dict(self.keyframe)
        if len(self.channels) != 2 or any(ch % 8 for ch in self.channels):
            raise ValueError(
                f"{who}: channels={self.channels}; the keyframe design takes two levels (fine, coarse), each a "
                f"multiple of 8 (GroupNorm of 8 groups), e.g. (96, 128)"
            )
        if image.factor != self.patch or tuple(image.image_size) != self.size:
            raise ValueError(
                f"{who}: the keyframe's image tokenizer codes {tuple(image.image_size)} images at factor "
                f"{image.factor}, the clip is {self.size} at patch {self.patch}; they must agree (the motion "
                f"network copies the keyframe's blocks): build the config with "
                f"VideoTokenizerConfig.keyframe_default(image_config)"
            )
        if self.search_radius < 1:
            raise ValueError(
                f"{who}: search_radius={self.search_radius}; give the farthest block offset the decoder may copy "
                f"from, >= 1 (8 blocks = 32 pixels covers the built-in world's motions)"
            )

    @property
    def space_factor(self) -> int:
        return self.patch * 2 ** (len(self.channels) - 1)

    @property
    def latent_frames(self) -> int:
        """Latent frames of the token grid: the first frame alone, then one per
        ``time_factor`` frames (causal); for the keyframe design, the motion grid's."""
        return (0 if self.design == "keyframe" else 1) + (self.frames - 1) // self.time_factor

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (latent frames, height, width); for the keyframe design the motion
        tokens' grid (the keyframe's is :attr:`keyframe_grid`)."""
        f = self.space_factor
        return self.latent_frames, self.size[0] // f, self.size[1] // f

    @property
    def keyframe_grid(self) -> tuple[int, int]:
        """The keyframe's token grid ((0, 0) for the causal design)."""
        if self.keyframe is None:
            return (0, 0)
        return ImageTokenizerConfig.from_dict(self.keyframe).grid

    @property
    def tokens(self) -> int:
        return math.prod(self.keyframe_grid) + math.prod(self.grid)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("size", "channels", "levels", "kernel"):
            d[key] = list(d[key])
        if self.design == "causal":  # (causal configs keep the form they had before the keyframe design)
            for key in ("design", "keyframe", "search_radius"):
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoTokenizerConfig:
        return cls(**d)

    @classmethod
    def default(cls) -> VideoTokenizerConfig:
        """The shipped configuration: the keyframe design (:meth:`keyframe_default`), 9 frames of
        64×64 at 8 fps → 256 keyframe + 256 motion ids of 1024 + 512 codes."""
        return cls.keyframe_default()

    @classmethod
    def causal(cls) -> VideoTokenizerConfig:
        """The causal 3D design (the dataclass defaults, and the checkpoint shipped before the
        keyframe one): 9 frames of 64×64 → 5×8×8 = 320 tokens of 1000 FSQ codes."""
        return cls()

    @classmethod
    def keyframe_default(cls, image: Any = None) -> VideoTokenizerConfig:
        """The keyframe design (:mod:`.keyframe`): frame 0 coded by the image tokenizer of
        configuration ``image`` (default: the shipped built-in one, 16×16 ids of 1024 codes),
        frames 1–8 as 4 × 8 × 8 motion ids of 512 VQ codes: 512 ids of 1536 codes."""
        image = image if image is not None else ImageTokenizerConfig.builtin()
        return cls(
            design="keyframe", keyframe=image.to_dict(), size=tuple(image.image_size), patch=image.factor,
            channels=(96, 128), blocks=2,
            latent_dim=8, quantizer="vq", codebook_size=512,
            quantizer_options={"kmeans_init": True, "gradient": "rotation"},
        )

    @classmethod
    def debug_keyframe(cls) -> VideoTokenizerConfig:
        """The keyframe design, tiny (tests): 5 frames of 32×32, keyframe from
        ``ImageTokenizerConfig.debug()`` (8×8 ids of 64 codes) + 2×4×4 motion ids of 32 codes."""
        image = ImageTokenizerConfig.debug()
        return cls(
            frames=5, size=(32, 32), design="keyframe", keyframe=image.to_dict(), patch=image.factor,
            channels=(16, 16), blocks=1, latent_dim=4, quantizer="vq", codebook_size=32, search_radius=2,
            quantizer_options={"kmeans_init": True},
        )

    @classmethod
    def debug(cls) -> VideoTokenizerConfig:
        """Tiny and fast (tests): 5 frames of 16×16 → 3×2×2 = 12 tokens of 60 codes."""
        return cls(frames=5, size=(16, 16), channels=(32,), latent_dim=3, levels=(5, 4, 3), codebook_size=60)


def build_quantizer(config: VideoTokenizerConfig) -> Quantizer:
    if config.quantizer == "fsq":
        return FSQ(list(config.levels), dim=config.latent_dim, **config.quantizer_options)
    return VectorQuantizer(config.latent_dim, config.codebook_size, **config.quantizer_options)


class CausalConv3d(nn.Module):
    """A 3D convolution that pads only the past in time (by repeating the first frame), so
    output frame ``t`` depends on input frames ``<= t``; space is zero-padded on both sides."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: tuple[int, int, int] = (3, 3, 3),
        stride: tuple[int, int, int] = (1, 1, 1),
    ) -> None:
        super().__init__()
        kt, kh, kw = kernel
        self.time_pad = kt - 1
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=(0, kh // 2, kw // 2))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T, H, W)
        if self.time_pad:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1), x], dim=2)
        return self.conv(x)


class ChannelNorm(nn.Module):
    """LayerNorm over channels at every (t, h, w) position. Unlike GroupNorm it has no
    statistics over space or time, so training on crops and encoding whole clips see the
    same normalisation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T, H, W)
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class ResBlock3d(nn.Module):
    """ChannelNorm → SiLU → causal conv, twice, plus the input."""

    def __init__(self, channels: int, kernel: tuple[int, int, int]) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ChannelNorm(channels),
            nn.SiLU(),
            CausalConv3d(channels, channels, kernel),
            ChannelNorm(channels),
            nn.SiLU(),
            CausalConv3d(channels, channels, kernel),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def space_time_unshuffle(x: Tensor, t: int, p: int) -> Tensor:
    """(B, C, T, H, W) → (B, C·t·p·p, T/t, H/p, W/p): space-time depth-to-channels."""
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T // t, t, H // p, p, W // p, p)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(B, C * t * p * p, T // t, H // p, W // p)


def space_time_shuffle(x: Tensor, t: int, p: int) -> Tensor:
    """Inverse of :func:`space_time_unshuffle`."""
    B, D, T, H, W = x.shape
    C = D // (t * p * p)
    x = x.reshape(B, C, t, p, p, T, H, W)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(B, C, T * t, H * p, W * p)


class VideoAutoencoder(nn.Module):
    """Clip ↔ latent grid ↔ token grid (see the module docstring for the shapes)."""

    def __init__(self, config: VideoTokenizerConfig) -> None:
        super().__init__()
        c = self.config = config
        ch, k, tf, p = c.channels, c.kernel, c.time_factor, c.patch
        stem = 3 * tf * p * p
        enc: list[nn.Module] = [nn.Conv3d(stem, ch[0], 1)]
        for i, width in enumerate(ch):
            if i:
                enc.append(CausalConv3d(ch[i - 1], width, k, stride=(1, 2, 2)))
            enc += [ResBlock3d(width, k) for _ in range(c.blocks)]
        enc += [ChannelNorm(ch[-1]), nn.SiLU(), nn.Conv3d(ch[-1], c.latent_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.quantizer = build_quantizer(c)
        dec: list[nn.Module] = [nn.Conv3d(c.latent_dim, ch[-1], 1)]
        for i in range(len(ch) - 1, -1, -1):
            dec += [ResBlock3d(ch[i], k) for _ in range(c.blocks)]
            if i:
                dec += [
                    nn.Upsample(scale_factor=(1, 2, 2), mode="nearest"),
                    CausalConv3d(ch[i], ch[i - 1], k),
                ]
        dec += [ChannelNorm(ch[0]), nn.SiLU(), nn.Conv3d(ch[0], stem, 1)]
        self.decoder = nn.Sequential(*dec)

    # clip (B, T, 3, H, W) in [0, 1]  <->  network input (B, 3, T + tf - 1, H, W) in [-1, 1]
    def _to_latent(self, clip: Tensor) -> Tensor:
        tf = self.config.time_factor
        x = clip.permute(0, 2, 1, 3, 4) * 2 - 1  # (B, 3, T, H, W)
        x = torch.cat([x[:, :, :1].expand(-1, -1, tf - 1, -1, -1), x], dim=2)  # first frame alone
        return self.encoder(space_time_unshuffle(x, tf, self.config.patch))  # (B, D, t, h, w)

    def _from_latent(self, z: Tensor) -> Tensor:
        tf = self.config.time_factor
        x = space_time_shuffle(self.decoder(z), tf, self.config.patch)[:, :, tf - 1 :]  # drop the repeats
        return ((x + 1) / 2).permute(0, 2, 1, 3, 4)  # (B, T, 3, H, W)

    def forward(self, clip: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """(B, T, 3, H, W) → (reconstruction (B, T, 3, H, W), quantizer output)."""
        z = self._to_latent(clip)
        q = self.quantizer(z.permute(0, 2, 3, 4, 1))  # channel-last (B, t, h, w, D)
        return self._from_latent(q.quantized.permute(0, 4, 1, 2, 3)), q

    @property
    def codebook_size(self) -> int:
        """The size of the clip's id space (the quantizer's codebook)."""
        return self.quantizer.codebook_size

    @property
    def code_shape(self) -> tuple[int, ...]:
        """The shape of one clip's ids as :meth:`encode_codes` gives and :meth:`decode_codes` takes."""
        return self.config.grid

    @torch.no_grad()
    def encode_codes(self, clip: Tensor) -> Tensor:
        """(B, T, 3, H, W) → indices (B, t, h, w)."""
        return self.quantizer.encode(self._to_latent(clip).permute(0, 2, 3, 4, 1))

    @torch.no_grad()
    def reconstruct_continuous(self, clip: Tensor) -> Tensor:
        """(B, T, 3, H, W) → the reconstruction without quantization (a diagnostic: how
        much of the error is the network's rather than the codebook's). VQ only: FSQ's
        decoder expects bounded latents, so skipping it would not measure the network."""
        if self.config.quantizer != "vq":
            raise ValueError(f"reconstruct_continuous needs a VQ tokenizer (this one is {self.config.quantizer!r}): "
                             f"an FSQ decoder expects bounded latents")
        return self._from_latent(self._to_latent(clip)).clamp(0, 1)

    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        """indices (B, t, h, w) → clip (B, T, 3, H, W), unclamped."""
        return self._from_latent(self.quantizer.decode(codes).permute(0, 4, 1, 2, 3))


def build_video_model(config: VideoTokenizerConfig) -> nn.Module:
    """The network of ``config.design``: :class:`VideoAutoencoder` (``"causal"``) or
    :class:`~.keyframe.KeyframeVideoAutoencoder` (``"keyframe"``). Both take clips
    ``(B, T, 3, H, W)`` in [0, 1] and offer ``forward``, ``encode_codes``, ``decode_codes``,
    ``reconstruct_continuous``, ``codebook_size`` and ``code_shape``."""
    if config.design == "keyframe":
        from .keyframe import KeyframeVideoAutoencoder

        return KeyframeVideoAutoencoder(config)
    return VideoAutoencoder(config)
