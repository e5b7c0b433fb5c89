"""The keyframe video tokenizer's network: frame 0 coded as an image, the rest as motion
ids decoded by moving the keyframe's pixels.

The causal 3D autoencoder (:mod:`.model`) spends the same kind of token on every latent
frame and must redraw each object from an 8 × 8 grid of codes per pair of frames; on the
built-in world it stalls near 22.5 dB whatever its size, with blurred shapes and ghosting
along fast motion. Here a clip is split the way video codecs split it — an intra-coded
keyframe, then motion-compensated frames (block motion compensation of MPEG-style
codecs; the cost volume of optical-flow networks, e.g. PWC-Net, Sun et al. 2018) — with
learned, discrete motion codes:

    clip (B, 9, 3, 64, 64) in [0, 1]
      frame 0 -> the image tokenizer (frozen; its weights live in this checkpoint)
                 -> 16 × 16 = 256 keyframe ids (codes 0 .. K_image-1) -> decoded keyframe
      encoder, per pair of frames 1..8 (time /2), at the 16 × 16 grid of 4 × 4 blocks:
         the pair's blocks, the keyframe's, and the cost of matching every block of the
         pair against the keyframe's blocks at each offset within ``search_radius`` cells
         -> conv, ResBlocks -> stride-2 conv, ResBlocks -> 8 × 8 -> VQ (512 codes of dim 8)
         = 4 × 8 × 8 = 256 motion ids (codes K_image .. K_image + 511)
      decoder, per pair: motion codes -> ResBlocks at 8 × 8 -> upsample to 16 × 16
         -> for every block of each frame, a softmax over the (2r+1)² offsets: the block
            is that mixture of the keyframe's blocks ("where it came from")
         -> plus a correction from ResBlocks that see the moved frame (new colours,
            growth, uncovered background).

512 ids per clip in one flat codebook of ``K_image + codebook_size`` codes: the keyframe
ids first (row by row), then the motion ids (pair by pair, row by row). Copying keyframe
blocks keeps edges as sharp as the image tokenizer made them wherever an object only
moves (objects travel up to 32 pixels = 8 blocks in a clip), and a static background costs
the motion codes nothing (offset 0 everywhere, which the decoder's initial bias favours).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.quantizers import QuantizerOutput
from ..image.model import ImageAutoencoder, ImageTokenizerConfig
from ..image.model import ResBlock as ImageResBlock

if TYPE_CHECKING:
    from .model import VideoTokenizerConfig

__all__ = ["KeyframeVideoAutoencoder", "local_blocks", "match_costs"]


def ResBlock(channels: int) -> nn.Module:
    """The image tokenizer's residual block (GroupNorm of 8 groups → SiLU → conv3×3, twice)."""
    return ImageResBlock(channels, 8)


def local_blocks(x: Tensor, radius: int) -> Tensor:
    """``(N, C, h, w)`` → ``(N, C, K, h, w)`` with ``K = (2·radius + 1)²``: for every cell,
    the ``C`` values of the cell at each offset ``(dy, dx)`` in ``[-radius, radius]²``
    (row-major over offsets; zeros outside the map)."""
    N, C, h, w = x.shape
    k = 2 * radius + 1
    return F.unfold(x, k, padding=radius).reshape(N, C, k * k, h, w)


def match_costs(frames: Tensor, key_blocks: Tensor) -> Tensor:
    """Block matching: ``frames`` ``(B, F, C, h, w)``, ``key_blocks`` ``(B, C, K, h, w)``
    (:func:`local_blocks` of the keyframe) → ``(B, F, K, h, w)``, the mean squared
    difference between each frame's cell and the keyframe's cell at every offset (a cost
    volume, as optical-flow networks build one)."""
    C = frames.shape[2]
    cross = torch.einsum("bfchw,bckhw->bfkhw", frames, key_blocks)
    return (frames.pow(2).sum(2, keepdim=True) + key_blocks.pow(2).sum(1)[:, None] - 2 * cross) / C


class KeyframeVideoAutoencoder(nn.Module):
    """Clip ↔ keyframe ids + motion ids (see the module docstring). ``config.keyframe`` is
    the image tokenizer's configuration; its weights are part of this module's state
    (``keyframe.*``) and never trained here (:meth:`load_keyframe` copies them in)."""

    def __init__(self, config: VideoTokenizerConfig) -> None:
        super().__init__()
        from .model import build_quantizer

        c = self.config = config
        if c.keyframe is None:
            raise ValueError("KeyframeVideoAutoencoder needs config.keyframe (an image tokenizer configuration)")
        self.keyframe = ImageAutoencoder(ImageTokenizerConfig.from_dict(c.keyframe)).eval()
        self.keyframe.requires_grad_(False)
        self.keyframe_codes = self.keyframe.quantizer.codebook_size
        fine, coarse = c.channels
        p, tf, r = c.patch, c.time_factor, c.search_radius
        self.pairs = (c.frames - 1) // tf
        self.offsets = (2 * r + 1) ** 2
        pix = 3 * p * p
        self.time_enc = nn.Parameter(torch.zeros(self.pairs, fine, 1, 1))
        self.time_dec = nn.Parameter(torch.zeros(self.pairs, fine, 1, 1))
        # encoder: the pair's pixels, the keyframe's, and the pair's block-matching costs
        self.encoder_in = nn.Conv2d(pix * (tf + 1) + tf * self.offsets, fine, 3, padding=1)
        self.encoder_fine = nn.Sequential(*[ResBlock(fine) for _ in range(c.blocks)])
        self.encoder_coarse = nn.Sequential(
            nn.Conv2d(fine, coarse, 3, stride=2, padding=1),
            *[ResBlock(coarse) for _ in range(c.blocks)],
            nn.GroupNorm(8, coarse),
            nn.SiLU(),
            nn.Conv2d(coarse, c.latent_dim, 1),
        )
        self.quantizer = build_quantizer(c)
        self.decoder_coarse = nn.Sequential(
            nn.Conv2d(c.latent_dim, coarse, 3, padding=1),
            *[ResBlock(coarse) for _ in range(c.blocks)],
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(coarse, fine, 3, padding=1),
        )
        # where each cell of each frame copies its pixels from: logits over the offsets
        self.decoder_motion = nn.Sequential(
            ResBlock(fine), nn.GroupNorm(8, fine), nn.SiLU(), nn.Conv2d(fine, tf * self.offsets, 3, padding=1)
        )
        head = self.decoder_motion[-1]
        nn.init.zeros_(head.weight)
        with torch.no_grad():  # favour offset 0 at the start (e^4 against 1 for each other offset)
            head.bias.copy_(torch.zeros(tf, self.offsets).index_fill_(1, torch.tensor([self.offsets // 2]), 4.0).flatten())
        # then a correction of the motion-compensated frames (recolouring, growth, edges)
        self.refine_in = nn.Conv2d(fine + tf * pix, fine, 3, padding=1)
        self.refine = nn.Sequential(
            *[ResBlock(fine) for _ in range(c.blocks)],
            nn.GroupNorm(8, fine),
            nn.SiLU(),
            nn.Conv2d(fine, tf * pix, 3, padding=1),
        )
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)

    @property
    def codebook_size(self) -> int:
        """Keyframe codes then motion codes: the size of the clip's flat id space."""
        return self.keyframe_codes + self.quantizer.codebook_size

    def train(self, mode: bool = True) -> KeyframeVideoAutoencoder:
        super().train(mode)
        self.keyframe.eval()  # frozen: its quantizer's statistics never move
        return self

    def load_keyframe(self, image_model: ImageAutoencoder) -> None:
        """Copy a trained image tokenizer's weights in as the keyframe coder."""
        self.keyframe.load_state_dict(image_model.state_dict())

    # ---- pieces ----------------------------------------------------------------
    def _keyframe(self, clip: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, 3, H, W) → keyframe ids (B, kh, kw) and the decoded keyframe (B, 3, H, W)."""
        with torch.no_grad(), torch.autocast(clip.device.type, enabled=False):  # fp32, as at inference
            ids = self.keyframe.encode(clip[:, 0].float())
            return ids, self.keyframe.decode(ids)

    def _pairs(self, clip: Tensor) -> Tensor:
        """(B, T, 3, H, W) → frames 1.. in pairs, unshuffled: (B·P, tf·3·p², H/p, W/p)."""
        B, T, _, H, W = clip.shape
        x = clip[:, 1:].reshape(B * self.pairs, self.config.time_factor * 3, H, W) * 2 - 1
        return F.pixel_unshuffle(x, self.config.patch)

    def _key_map(self, key: Tensor) -> Tensor:
        """decoded keyframe (B, 3, H, W) → unshuffled (B, 3·p², h, w), in [-1, 1]."""
        return F.pixel_unshuffle(key * 2 - 1, self.config.patch)

    def _time(self, table: Tensor, n: int) -> Tensor:
        return table.repeat(n // self.pairs, 1, 1, 1)

    def _encode_latent(self, clip: Tensor, key: Tensor) -> Tensor:
        """→ motion latents (B, P, h/2, w/2, D), channel-last."""
        B, P, c = clip.shape[0], self.pairs, self.config
        key_map = self._key_map(key)  # (B, 3p², h, w)
        pairs = self._pairs(clip)  # (B·P, tf·3p², h, w)
        h, w = pairs.shape[-2:]
        costs = match_costs(pairs.reshape(B, P * c.time_factor, -1, h, w), local_blocks(key_map, c.search_radius))
        x = torch.cat([pairs, key_map.repeat_interleave(P, dim=0), costs.reshape(B * P, -1, h, w)], dim=1)
        x = self.encoder_fine(self.encoder_in(x) + self._time(self.time_enc, B * P))
        z = self.encoder_coarse(x)  # (B·P, D, h', w')
        return z.reshape(B, P, *z.shape[1:]).permute(0, 1, 3, 4, 2)

    def _decode_latent(self, zq: Tensor, key: Tensor) -> Tensor:
        """motion latents (B, P, h', w', D) + decoded keyframe → clip (B, T, 3, H, W) in [0, 1]."""
        B, P = zq.shape[:2]
        c, tf = self.config, self.config.time_factor
        x = self.decoder_coarse(zq.flatten(0, 1).permute(0, 3, 1, 2))
        x = x + self._time(self.time_dec, B * P)
        h, w = x.shape[-2:]
        blocks = local_blocks(self._key_map(key), c.search_radius)  # (B, 3p², K, h, w)
        weights = self.decoder_motion(x).reshape(B, P * tf, self.offsets, h, w).softmax(2)
        moved = torch.einsum("bckhw,bfkhw->bfchw", blocks, weights).reshape(B * P, -1, h, w)
        out = moved + self.refine(self.refine_in(torch.cat([x, moved], dim=1)))
        frames = F.pixel_shuffle(out, c.patch).reshape(B, P * tf, 3, *c.size)
        return torch.cat([key[:, None], (frames + 1) / 2], dim=1)

    # ---- the interface the tokenizer and the trainer use ------------------------------
    def forward(self, clip: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """(B, T, 3, H, W) → (reconstruction (B, T, 3, H, W), the motion quantizer's output)."""
        _, key = self._keyframe(clip)
        q = self.quantizer(self._encode_latent(clip, key))
        return self._decode_latent(q.quantized, key), q

    @torch.no_grad()
    def encode_codes(self, clip: Tensor) -> Tensor:
        """(B, T, 3, H, W) → ids (B, tokens): keyframe ids, then motion ids + K_image."""
        ids, key = self._keyframe(clip)
        motion = self.quantizer.encode(self._encode_latent(clip, key))
        return torch.cat([ids.flatten(1), motion.flatten(1) + self.keyframe_codes], dim=1)

    def _split(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        c = self.config
        kh, kw = self.keyframe.config.grid
        n_key = kh * kw
        if codes.dim() != 2 or codes.shape[1] != c.tokens:
            raise ValueError(
                f"decode_codes: codes of shape {tuple(codes.shape)}; expected (batch, {c.tokens}) "
                f"({n_key} keyframe ids then {c.tokens - n_key} motion ids)"
            )
        key, motion = codes[:, :n_key], codes[:, n_key:]
        if key.numel() and (int(key.min()) < 0 or int(key.max()) >= self.keyframe_codes):
            raise ValueError(
                f"decode_codes: keyframe ids (the first {n_key}) range {int(key.min())}..{int(key.max())}; "
                f"they must lie in 0..{self.keyframe_codes - 1}"
            )
        if int(motion.min()) < self.keyframe_codes or int(motion.max()) >= self.codebook_size:
            raise ValueError(
                f"decode_codes: motion ids (positions {n_key}..{c.tokens - 1}) range "
                f"{int(motion.min())}..{int(motion.max())}; they must lie in "
                f"{self.keyframe_codes}..{self.codebook_size - 1}"
            )
        return key.reshape(-1, kh, kw), motion - self.keyframe_codes

    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        """ids (B, tokens) → clip (B, T, 3, H, W), unclamped."""
        key_ids, motion = self._split(codes)
        key = self.keyframe.decode(key_ids)
        P, h, w = self.config.grid
        zq = self.quantizer.decode(motion.reshape(-1, P, h, w))
        return self._decode_latent(zq, key)

    @torch.no_grad()
    def reconstruct_continuous(self, clip: Tensor) -> Tensor:
        """The reconstruction with the motion quantizer bypassed (the keyframe stays coded)."""
        _, key = self._keyframe(clip)
        return self._decode_latent(self._encode_latent(clip, key), key).clamp(0, 1)

    @property
    def code_shape(self) -> tuple[int, ...]:
        return (self.config.tokens,)
