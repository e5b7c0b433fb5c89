"""The image tokenizer plugin: images ⇄ a grid of discrete tokens (VQGAN-style autoencoder
with an FSQ or VQ bottleneck, :mod:`.model`), registered as modality ``"image"``.

Token layout (``"grid"``): ``[height, width, code, code, ...]`` — two meta tokens give the
token grid's height and width (1..``max_grid``), so non-square images round-trip and an
LLM can choose the shape it generates; then ``height * width`` codes in raster order.
A 64×64 built-in-world image is 2 + 16·16 = 258 tokens of a 1024-code book.

    from tessera.modalities.image import ImageTokenizer
    tok = ImageTokenizer.pretrained()          # the shipped built-in-world checkpoint
    ids = tok.encode(tok.read("photo.jpg"))    # 1-D LongTensor of local ids
    tok.write(tok.decode(ids), "back.png")

``encode`` takes canonical images only (``float32 (3, H, W)`` in [0, 1], sides divisible by
the factor) and raises otherwise; ``read`` applies the documented resize/crop policy of
:func:`.io.fit_image` (shorter side → ``image_size``'s shorter side).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from tessera.core.checkpoint import sha256_tensors
from tessera.core.registry import register_modality
from tessera.core.spec import LayoutError, MetaField, ModalitySpec, TokenLayout
from tessera.core.tokenizer_files import (
    load_weights,
    pretrained_folder,
    read_tokenizer_folder,
    save_tokenizer_folder,
)
from torch import Tensor

from .io import IMAGE_EXTENSIONS, check_image_tensor, fit_image, load_image, save_image
from .model import ImageAutoencoder, ImageTokenizerConfig

__all__ = ["ImageTokenizer", "ImageTokenizerConfig", "WEIGHTS_DIR", "VERSION"]

VERSION = "1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@register_modality
class ImageTokenizer:
    """Image ⇄ tokens. Build with a config (random weights), :meth:`load` a folder, or
    :meth:`pretrained` for the shipped checkpoint."""

    name: ClassVar[str] = "image"
    media_kind: ClassVar[str] = "image"
    file_extensions: ClassVar[tuple[str, ...]] = IMAGE_EXTENSIONS

    def __init__(self, config: ImageTokenizerConfig | None = None, *, model: ImageAutoencoder | None = None) -> None:
        self.config = config or ImageTokenizerConfig()
        self.model = (model or ImageAutoencoder(self.config)).eval()

    # ---- contract -------------------------------------------------------------------
    @property
    def layout(self) -> TokenLayout:
        g = self.config.max_grid
        return TokenLayout(
            kind="grid",
            levels=(self.model.quantizer.codebook_size,),  # the quantizer's own count (FSQ (8,5,5,5) has 1000)
            meta=(MetaField(name="height", low=1, high=g), MetaField(name="width", low=1, high=g)),
        )

    @property
    def spec(self) -> ModalitySpec:
        return ModalitySpec(
            name=self.name,
            version=VERSION,
            media_kind=self.media_kind,
            layout=self.layout,
            fingerprint=sha256_tensors(self.model.state_dict()),
            extra={"factor": self.config.factor, "image_size": list(self.config.image_size)},
        )

    def _check_media(self, image: object, who: str) -> Tensor:
        image = check_image_tensor(image, who)
        f, g = self.config.factor, self.config.max_grid
        _, H, W = image.shape
        if H % f or W % f:
            raise ValueError(
                f"{who}: image is {H}x{W}, the image tokenizer needs sides divisible by {f}; resize or crop "
                f"(ImageTokenizer.read does this, see tessera.modalities.image.io.fit_image)"
            )
        if H // f > g or W // f > g:
            raise ValueError(
                f"{who}: image is {H}x{W}, a {H // f}x{W // f} token grid; the largest is {g}x{g} "
                f"({g * f}x{g * f} pixels); downscale it"
            )
        return image

    @torch.no_grad()
    def encode_batch(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` canonical images of one size → ``(B, 2 + H*W/f²)`` local ids."""
        if not torch.is_tensor(images) or images.ndim != 4:
            raise ValueError(f"encode_batch: expected (B, 3, H, W), got {getattr(images, 'shape', type(images))}")
        for i in range(images.shape[0]):
            self._check_media(images[i], f"encode_batch[{i}]")
        codes = self.model.encode(images.float())  # (B, h, w)
        B, h, w = codes.shape
        layout = self.layout
        meta = torch.tensor([off + v - m.low for m, off, v in zip(layout.meta, layout.meta_offsets, (h, w), strict=True)])
        return torch.cat([meta.expand(B, 2), codes.reshape(B, -1) + layout.level_offsets[0]], dim=1)

    def encode(self, media: Tensor) -> Tensor:
        """Canonical image ``(3, H, W)`` → 1-D local ids ``[h, w, codes...]``."""
        image = self._check_media(media, "ImageTokenizer.encode")
        codes = self.model.encode(image[None])[0]  # (h, w)
        h, w = codes.shape
        return self.layout.flatten(codes.reshape(-1), {"height": h, "width": w})

    @torch.no_grad()
    def decode_batch(self, ids: Tensor) -> Tensor:
        """``(B, N)`` local ids of one grid size → ``(B, 3, H, W)`` images."""
        if not torch.is_tensor(ids) or ids.ndim != 2 or ids.is_floating_point() or ids.is_complex():
            raise LayoutError(
                f"decode_batch: expected integer ids of shape (B, N), got "
                f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}"
            )
        grids = [self.layout.unflatten(row) for row in ids]
        shapes = {(m["height"], m["width"]) for m, _ in grids}
        if len(shapes) != 1:
            raise LayoutError(f"decode_batch: rows have different grid sizes {sorted(shapes)}; decode them one by one")
        h, w = shapes.pop()
        codes = torch.stack([c.reshape(h, w) for _, c in grids])
        return self.model.decode(codes)

    def decode(self, ids: Tensor) -> Tensor:
        """1-D local ids ``[h, w, codes...]`` → canonical image ``(3, h*f, w*f)``."""
        if not torch.is_tensor(ids) or ids.ndim != 1:
            raise LayoutError(f"ImageTokenizer.decode: expected 1-D ids, got {getattr(ids, 'shape', type(ids))}")
        return self.decode_batch(ids[None])[0]

    def read(self, path: str) -> Tensor:
        """An image file → canonical image fitted to this tokenizer (see :mod:`.io`)."""
        side = min(self.config.image_size)
        f = self.config.factor
        return fit_image(load_image(path), side=side, multiple=f, max_side=self.config.max_grid * f)

    def write(self, media: Tensor, path: str) -> None:
        save_image(media, path)

    def save(self, path: str) -> None:
        save_tokenizer_folder(path, state=self.model.state_dict(), config_key="config", config=self.config.to_dict(),
                              spec=self.spec, format_version=None)

    @classmethod
    def load(cls, path: str) -> ImageTokenizer:
        config, state = read_tokenizer_folder(path, config_key="config", format_version=None)
        tok = cls(ImageTokenizerConfig.from_dict(config))
        load_weights(tok.model, state, path)
        return tok

    @classmethod
    def pretrained(cls) -> ImageTokenizer:
        """The shipped built-in-world checkpoint (``weights/``)."""
        hint = "train one with `tessera tokenizer train image --data builtin --out runs/image`"
        return cls.load(str(pretrained_folder(WEIGHTS_DIR, modality="image", hint=hint)))

    @classmethod
    def debug(cls) -> ImageTokenizer:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return cls(ImageTokenizerConfig.debug())

    def example(self, seed: int) -> Tensor:
        from tessera.modalities.world.visual import image_example

        return image_example(seed, size=self.config.image_size)
