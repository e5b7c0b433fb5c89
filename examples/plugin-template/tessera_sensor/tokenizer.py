"""A multichannel sensor time-series tokenizer: a per-frame MLP autoencoder with a
finite scalar quantization bottleneck (FSQ, Mentzer et al. 2023, "Finite Scalar
Quantization: VQ-VAE Made Simple").

A chunk of ``chunk`` time steps x ``channels`` channels (e.g. 64 x 3 accelerometer
readings) is cut into ``chunk // frame`` frames; each frame becomes one token, so the
modality has a ``"fixed"`` layout of 16 steps with one codebook level of
``prod(fsq_levels)`` codes. Files are CSV: a header row of channel names, then one row
per time step.

This file is the template users copy: everything a Tessera modality plugin needs is
here (see docs/plugins.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from tessera.core.checkpoint import load_json, load_tensors, save_json, save_tensors, sha256_tensors
from tessera.core.spec import ModalitySpec, TokenLayout
from torch import Tensor, nn

__all__ = ["SensorConfig", "SensorTokenizer", "TrainConfig", "split_chunks", "train"]


@dataclass(frozen=True, kw_only=True)
class SensorConfig:
    channels: int = 3
    chunk: int = 64  # time steps per encoded chunk
    frame: int = 4  # time steps per token
    hidden: int = 64
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    sample_rate: float = 50.0  # Hz, documentation for the app

    def __post_init__(self) -> None:
        if self.chunk % self.frame:
            raise ValueError(
                f"chunk={self.chunk} is not a multiple of frame={self.frame}; pick a chunk like "
                f"{self.frame * max(1, self.chunk // self.frame)}"
            )
        if self.channels < 1 or self.hidden < 1:
            raise ValueError(f"channels={self.channels} and hidden={self.hidden} must be >= 1")

    @classmethod
    def debug(cls) -> SensorConfig:
        return cls(hidden=16, fsq_levels=(5, 5, 5))

    @classmethod
    def from_dict(cls, d: dict) -> SensorConfig:
        return cls(**{**d, "fsq_levels": tuple(d["fsq_levels"])})


class SensorTokenizer(nn.Module):
    """Tessera modality plugin ``sensor``: media is ``float32 (chunk, channels)`` in sensor units."""

    name: ClassVar[str] = "sensor"
    media_kind: ClassVar[str] = "timeseries"
    file_extensions: ClassVar[tuple[str, ...]] = (".csv",)

    def __init__(self, config: SensorConfig = SensorConfig()) -> None:
        from tessera.core.quantizers.fsq import FSQ

        super().__init__()
        self.config = config
        c = config
        d_in = c.frame * c.channels
        self.encoder = nn.Sequential(nn.Linear(d_in, c.hidden), nn.GELU(), nn.Linear(c.hidden, c.hidden))
        self.quantizer = FSQ(levels=list(c.fsq_levels), dim=c.hidden)
        self.decoder = nn.Sequential(nn.Linear(c.hidden, c.hidden), nn.GELU(), nn.Linear(c.hidden, d_in))
        # per-channel normalisation, fitted by train()
        self.register_buffer("mean", torch.zeros(c.channels))
        self.register_buffer("std", torch.ones(c.channels))
        self.eval()

    # ---- the contract ------------------------------------------------------------
    @property
    def spec(self) -> ModalitySpec:
        c = self.config
        return ModalitySpec(
            name=self.name,
            version="0.1.0",
            media_kind=self.media_kind,
            layout=TokenLayout(kind="fixed", levels=(math.prod(c.fsq_levels),), steps=c.chunk // c.frame),
            fingerprint=sha256_tensors(self.state_dict()),
            extra={"channels": c.channels, "chunk": c.chunk, "sample_rate": c.sample_rate},
        )

    def _frames(self, media: Tensor) -> Tensor:
        """(B, chunk, channels) in sensor units → normalised frames (B, steps, frame * channels)."""
        c = self.config
        x = (media - self.mean) / self.std
        return x.reshape(x.shape[0], c.chunk // c.frame, c.frame * c.channels)

    def _unframe(self, frames: Tensor) -> Tensor:
        c = self.config
        x = frames.reshape(frames.shape[0], c.chunk, c.channels)
        return x * self.std + self.mean

    def check_media(self, media: object) -> Tensor:
        c = self.config
        if not isinstance(media, Tensor) or not media.is_floating_point():
            raise ValueError(f"sensor: media must be a float tensor (chunk, channels) = ({c.chunk}, {c.channels}), "
                             f"got {type(media).__name__}")
        if media.shape != (c.chunk, c.channels):
            raise ValueError(
                f"sensor: series has shape {tuple(media.shape)}, expected ({c.chunk}, {c.channels}) "
                f"(time steps, channels); cut long series with split_chunks() and give {c.channels} channels"
            )
        if not torch.isfinite(media).all():
            raise ValueError("sensor: series contains NaN or inf; fill the gaps before encoding")
        return media.float()

    @torch.no_grad()
    def encode(self, media: Tensor) -> Tensor:
        x = self.check_media(media)
        codes = self.quantizer.encode(self.encoder(self._frames(x[None])))[0]  # (steps,)
        return self.spec.layout.flatten(codes)

    @torch.no_grad()
    def decode(self, ids: Tensor) -> Tensor:
        _, codes = self.spec.layout.unflatten(ids)
        z = self.quantizer.decode(codes[:, 0][None])  # (1, steps, hidden)
        return self._unframe(self.decoder(z))[0]

    def forward(self, media: Tensor) -> tuple[Tensor, Tensor]:
        """Training pass on a batch (B, chunk, channels) → (reconstruction, quantizer loss)."""
        out = self.quantizer(self.encoder(self._frames(media)))
        return self._unframe(self.decoder(out.quantized)), out.loss

    def read(self, path: str) -> Tensor:
        try:
            data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{path}: not a sensor CSV ({e}); expected a header row, then one row of "
                f"{self.config.channels} numbers per time step"
            ) from e
        if data.shape[1] != self.config.channels:
            raise ValueError(
                f"{path}: {data.shape[1]} column(s), the sensor tokenizer needs {self.config.channels}; "
                f"select the channels it was trained on"
            )
        return torch.from_numpy(data)

    def write(self, media: Tensor, path: str) -> None:
        header = ",".join(f"ch{i}" for i in range(media.shape[1]))
        np.savetxt(path, media.detach().cpu().numpy(), delimiter=",", header=header, comments="")

    def save(self, path: str) -> None:
        folder = Path(path)
        save_json(folder / "config.json", asdict(self.config))
        save_tensors(folder / "weights.safetensors", self.state_dict())

    @classmethod
    def load(cls, path: str) -> SensorTokenizer:
        folder = Path(path)
        model = cls(SensorConfig.from_dict(load_json(folder / "config.json")))
        model.load_state_dict(load_tensors(folder / "weights.safetensors"))
        return model.eval()

    @classmethod
    def debug(cls) -> SensorTokenizer:
        with torch.random.fork_rng(devices=[]):  # a fixed init without touching the caller's RNG
            torch.manual_seed(0)
            return cls(SensorConfig.debug())

    def example(self, seed: int) -> Tensor:
        """A synthetic IMU-like chunk: per channel a sum of two sinusoids plus noise."""
        c = self.config
        g = torch.Generator().manual_seed(seed)
        t = torch.arange(c.chunk, dtype=torch.float32)[:, None] / c.sample_rate
        freq = 0.5 + 3.0 * torch.rand(2, c.channels, generator=g)
        phase = 2 * math.pi * torch.rand(2, c.channels, generator=g)
        amp = 0.5 + torch.rand(2, c.channels, generator=g)
        x = (amp[:, None] * torch.sin(2 * math.pi * freq[:, None] * t + phase[:, None])).sum(0)
        return x + 0.05 * torch.randn(c.chunk, c.channels, generator=g)


def split_chunks(series: Tensor, chunk: int) -> list[Tensor]:
    """Cut a long (T, channels) series into full chunks of ``chunk`` steps (the tail is dropped)."""
    return [series[i : i + chunk] for i in range(0, series.shape[0] - chunk + 1, chunk)]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0

    @classmethod
    def debug(cls) -> TrainConfig:
        return cls(steps=60, batch_size=16)


def train(model: SensorTokenizer, data: Iterable[Tensor], config: TrainConfig = TrainConfig()) -> list[float]:
    """Fit ``model`` on chunks (each ``(chunk, channels)``): normalisation from the data, then
    Adam on the reconstruction MSE (+ the quantizer's loss). Returns the loss per step."""
    x = torch.stack([model.check_media(m) for m in data])
    if x.shape[0] < 2:
        raise ValueError(f"train needs at least 2 chunks, got {x.shape[0]}; pass more data")
    model.mean.copy_(x.mean((0, 1)))
    model.std.copy_(x.std((0, 1)).clamp_min(1e-6))
    g = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.train()
    losses = []
    for _ in range(config.steps):
        batch = x[torch.randint(0, x.shape[0], (config.batch_size,), generator=g)]
        recon, q_loss = model(batch)
        loss = (((recon - batch) / model.std) ** 2).mean() + q_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
