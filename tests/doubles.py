"""Test-double modality plugins: small, deterministic, no neural network.

One plugin per token-layout kind (see :class:`tessera.core.spec.TokenLayout`), each a
complete :class:`~tessera.core.spec.ModalityPlugin` (spec, encode, decode, read, write,
save, load, debug, example) whose "weights" are a lookup table saved as safetensors:

* ``double_fixed``  - ``"fixed"``: a 1-D signal of 16 samples in [0, 1], rounded to
  32 levels, 16 tokens, 1 level per step (like an action chunk).
* ``double_grid``   - ``"grid"``: an RGB image ``(3, 2h, 2w)``, one grey-level token per
  2x2 patch, ``height``/``width`` meta tokens (like a non-square image).
* ``double_variable`` - ``"variable"``: mono audio of 1..64 samples in [-1, 1], one step
  per sample, 3 levels per step that refine each other (like a residual speech codec),
  closed by the end token.

Other tests use them through :func:`register_doubles` (``tests/`` is on ``sys.path``
under pytest, so ``from doubles import register_doubles``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tessera.core.checkpoint import load_json, load_tensors, save_json, save_tensors, sha256_tensors
from tessera.core.registry import get_modality, register_modality, registry
from tessera.core.spec import MetaField, ModalitySpec, TokenLayout
from torch import Tensor

__all__ = ["FixedDouble", "GridDouble", "VariableDouble", "DOUBLES", "register_doubles"]


def _fingerprint(config: Any, table: Tensor) -> str:
    return sha256_tensors({"table": table, "config": torch.tensor(list(json.dumps(asdict(config)).encode()))})


def _check_float(media: Any, who: str, shape_rule: str) -> Tensor:
    if not isinstance(media, Tensor) or not media.is_floating_point():
        raise ValueError(f"{who}: media must be a float tensor {shape_rule}, got {type(media).__name__}"
                         f"{'' if not isinstance(media, Tensor) else ' of dtype ' + str(media.dtype)}")
    if not torch.isfinite(media).all():
        raise ValueError(f"{who}: media contains NaN or inf; clean the signal before encoding")
    return media.float()


def _save(folder: str, config: Any, table: Tensor) -> None:
    save_json(Path(folder) / "config.json", asdict(config))
    save_tensors(Path(folder) / "weights.safetensors", {"table": table})


def _load_parts(folder: str) -> tuple[dict[str, Any], Tensor]:
    return load_json(Path(folder) / "config.json"), load_tensors(Path(folder) / "weights.safetensors")["table"]


# ---- fixed ----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class FixedConfig:
    length: int = 16
    bins: int = 32


@register_modality
class FixedDouble:
    """16 samples in [0, 1] → 16 tokens (nearest of ``bins`` evenly spaced values)."""

    name: ClassVar[str] = "double_fixed"
    media_kind: ClassVar[str] = "timeseries"
    file_extensions: ClassVar[tuple[str, ...]] = (".txt",)

    def __init__(self, config: FixedConfig, table: Tensor | None = None) -> None:
        self.config = config
        self.table = torch.linspace(0, 1, config.bins) if table is None else table

    @property
    def spec(self) -> ModalitySpec:
        c = self.config
        return ModalitySpec(
            name=self.name, version="1", media_kind=self.media_kind,
            layout=TokenLayout(kind="fixed", levels=(c.bins,), steps=c.length),
            fingerprint=_fingerprint(c, self.table),
        )

    def encode(self, media: Tensor) -> Tensor:
        x = _check_float(media, self.name, f"of shape ({self.config.length},)")
        if x.shape != (self.config.length,):
            raise ValueError(f"{self.name}: signal has shape {tuple(x.shape)}, expected ({self.config.length},); "
                             f"cut or pad it to {self.config.length} samples")
        codes = (x[:, None] - self.table).abs().argmin(dim=1)
        return self.spec.layout.flatten(codes)

    def decode(self, ids: Tensor) -> Tensor:
        _, codes = self.spec.layout.unflatten(ids)
        return self.table[codes[:, 0]]

    def read(self, path: str) -> Tensor:
        try:
            return torch.from_numpy(np.loadtxt(path, dtype=np.float32, ndmin=1))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a text file of one number per line ({e})") from e

    def write(self, media: Tensor, path: str) -> None:
        np.savetxt(path, media.numpy())

    def save(self, path: str) -> None:
        _save(path, self.config, self.table)

    @classmethod
    def load(cls, path: str) -> FixedDouble:
        cfg, table = _load_parts(path)
        return cls(FixedConfig(**cfg), table)

    @classmethod
    def debug(cls) -> FixedDouble:
        return cls(FixedConfig())

    def example(self, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(self.config.length, generator=g)


# ---- grid -----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class GridConfig:
    patch: int = 2
    max_side: int = 4  # patches per side
    grey_levels: int = 16


@register_modality
class GridDouble:
    """RGB ``(3, patch*h, patch*w)`` → ``h``, ``w`` meta tokens + one grey token per patch."""

    name: ClassVar[str] = "double_grid"
    media_kind: ClassVar[str] = "image"
    file_extensions: ClassVar[tuple[str, ...]] = (".png",)

    def __init__(self, config: GridConfig, table: Tensor | None = None) -> None:
        self.config = config
        self.table = torch.linspace(0, 1, config.grey_levels) if table is None else table

    @property
    def spec(self) -> ModalitySpec:
        c = self.config
        meta = (MetaField(name="height", low=1, high=c.max_side), MetaField(name="width", low=1, high=c.max_side))
        return ModalitySpec(
            name=self.name, version="1", media_kind=self.media_kind,
            layout=TokenLayout(kind="grid", levels=(c.grey_levels,), meta=meta),
            fingerprint=_fingerprint(c, self.table),
        )

    def encode(self, media: Tensor) -> Tensor:
        x = _check_float(media, self.name, "(3, H, W)")
        p, m = self.config.patch, self.config.max_side
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"{self.name}: image has shape {tuple(x.shape)}, expected (3, H, W)")
        _, H, W = x.shape
        if H % p or W % p or not (1 <= H // p <= m and 1 <= W // p <= m):
            raise ValueError(f"{self.name}: image is {H}x{W}, sides must be multiples of {p} up to {p * m}; "
                             f"resize or crop it")
        grey = x.mean(0).reshape(H // p, p, W // p, p).mean((1, 3)).reshape(-1)
        codes = (grey[:, None] - self.table).abs().argmin(dim=1)
        return self.spec.layout.flatten(codes, {"height": H // p, "width": W // p})

    def decode(self, ids: Tensor) -> Tensor:
        meta, codes = self.spec.layout.unflatten(ids)
        p = self.config.patch
        grey = self.table[codes[:, 0]].reshape(meta["height"], meta["width"])
        return grey.repeat_interleave(p, 0).repeat_interleave(p, 1).expand(3, -1, -1).clone()

    def read(self, path: str) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"{path}: not a readable image ({e})") from e
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def write(self, media: Tensor, path: str) -> None:
        from PIL import Image

        arr = (media.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(path)

    def save(self, path: str) -> None:
        _save(path, self.config, self.table)

    @classmethod
    def load(cls, path: str) -> GridDouble:
        cfg, table = _load_parts(path)
        return cls(GridConfig(**cfg), table)

    @classmethod
    def debug(cls) -> GridDouble:
        return cls(GridConfig())

    def example(self, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        h, w = (int(v) for v in torch.randint(1, self.config.max_side + 1, (2,), generator=g))
        p = self.config.patch
        return torch.rand(3, h * p, w * p, generator=g)


# ---- variable, 3 levels ---------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class VariableConfig:
    bins: int = 8  # codes per level
    num_levels: int = 3
    max_steps: int = 64
    sample_rate: int = 8000


@register_modality
class VariableDouble:
    """Mono audio in [-1, 1], 1..max_steps samples; each sample → ``num_levels`` codes, each
    level picking one of ``bins`` sub-intervals of the previous level's interval."""

    name: ClassVar[str] = "double_variable"
    media_kind: ClassVar[str] = "audio"
    file_extensions: ClassVar[tuple[str, ...]] = (".wav",)

    def __init__(self, config: VariableConfig, table: Tensor | None = None) -> None:
        self.config = config
        # table[l] = width of one level-l cell
        self.table = 2.0 / config.bins ** torch.arange(1, config.num_levels + 1).double() if table is None else table
        self.sample_rate = config.sample_rate

    @property
    def spec(self) -> ModalitySpec:
        c = self.config
        return ModalitySpec(
            name=self.name, version="1", media_kind=self.media_kind,
            layout=TokenLayout(kind="variable", levels=(c.bins,) * c.num_levels, max_steps=c.max_steps),
            fingerprint=_fingerprint(c, self.table),
        )

    def encode(self, media: Tensor) -> Tensor:
        x = _check_float(media, self.name, "(samples,)").double()
        c = self.config
        if x.ndim != 1 or not 1 <= x.numel() <= c.max_steps:
            raise ValueError(f"{self.name}: audio has shape {tuple(x.shape)}, expected (samples,) with "
                             f"1..{c.max_steps} samples; split longer audio into chunks")
        if x.abs().max() > 1:
            raise ValueError(f"{self.name}: samples reach {float(x.abs().max()):.3f}, outside [-1, 1]; normalise")
        low = torch.full_like(x, -1.0)
        codes = []
        for width in self.table:
            idx = ((x - low) / width).floor().clamp(0, c.bins - 1)
            low = low + idx * width
            codes.append(idx.long())
        return self.spec.layout.flatten(torch.stack(codes, dim=1))

    def decode(self, ids: Tensor) -> Tensor:
        _, codes = self.spec.layout.unflatten(ids)
        low = -1.0 + (codes.double() * self.table).sum(1)
        return (low + self.table[-1] / 2).float()

    def read(self, path: str) -> Tensor:
        import soundfile as sf

        try:
            data, sr = sf.read(path, dtype="float32", always_2d=True)
        except (RuntimeError, sf.LibsndfileError) as e:
            raise ValueError(f"{path}: not a readable audio file ({e})") from e
        if sr != self.sample_rate:
            raise ValueError(f"{path}: sample rate {sr} Hz, {self.name} needs {self.sample_rate} Hz; resample")
        return torch.from_numpy(data.mean(1))

    def write(self, media: Tensor, path: str) -> None:
        import soundfile as sf

        sf.write(path, media.numpy(), self.sample_rate, subtype="FLOAT")

    def save(self, path: str) -> None:
        _save(path, self.config, self.table)

    @classmethod
    def load(cls, path: str) -> VariableDouble:
        cfg, table = _load_parts(path)
        return cls(VariableConfig(**cfg), table)

    @classmethod
    def debug(cls) -> VariableDouble:
        return cls(VariableConfig())

    def example(self, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(1, self.config.max_steps + 1, (1,), generator=g))
        return torch.rand(n, generator=g) * 2 - 1


DOUBLES: tuple[type, ...] = (FixedDouble, GridDouble, VariableDouble)


def register_doubles() -> tuple[type, ...]:
    """Make sure the three doubles are registered (safe to call any number of times,
    also after a test unregistered one); returns their classes."""
    for cls in DOUBLES:
        if cls.name not in registry or get_modality(cls.name) is not cls:
            register_modality(cls, override=True)
    return DOUBLES
