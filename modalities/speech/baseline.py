"""The baseline a neural speech codec has to beat: a quantized mel spectrogram inverted
with Griffin-Lim (Griffin & Lim 1984, via torchaudio), at the same bitrate.

``frame_rate × n_mels × bits`` bits per second: every frame's log-mel vector is scalar-
quantized bin by bin with ``2**bits`` cells whose edges are the per-bin quantiles of
training speech and whose values are the cell means (a Lloyd-Max-style quantizer fitted
to the data, so the baseline spends its bits well). Decoding interpolates the frames to
the STFT hop, maps mel back to a linear magnitude spectrogram (``InverseMelScale``) and
recovers a phase with 32 Griffin-Lim iterations.

:func:`select_config` picks the split of a bitrate into (frame rate, mel bins, bits per
bin) by log-mel distance on a few validation clips, with fewer Griffin-Lim iterations, so
a benchmark pays for the search once and scores only the chosen split on held-out speech.
Griffin-Lim is FFT-bound and gains nothing from a second thread; on a busy machine it is
several times slower with two, so callers may run it on one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MelGriffinLimConfig", "MelGriffinLim", "configs_at_bitrate", "select_config"]


@dataclass(frozen=True, kw_only=True)
class MelGriffinLimConfig:
    sample_rate: int = 16_000
    frame_rate: float = 25.0
    n_mels: int = 16
    bits: int = 2
    n_fft: int = 1024
    hop: int = 160
    griffin_lim_iters: int = 32

    def __post_init__(self) -> None:
        if self.griffin_lim_iters < 1:
            raise ValueError(f"MelGriffinLimConfig: griffin_lim_iters={self.griffin_lim_iters} must be >= 1")
        if self.bits < 1 or self.n_mels < 1:
            raise ValueError(f"MelGriffinLimConfig: bits={self.bits} and n_mels={self.n_mels} must be >= 1")
        if self.sample_rate % self.frame_rate or (self.sample_rate / self.frame_rate) % self.hop:
            raise ValueError(
                f"MelGriffinLimConfig: frame_rate={self.frame_rate} must give a whole number of "
                f"{self.hop}-sample hops per frame at {self.sample_rate} Hz"
            )

    @property
    def bitrate(self) -> float:
        return self.frame_rate * self.n_mels * self.bits

    @property
    def hops_per_frame(self) -> int:
        return int(self.sample_rate / self.frame_rate) // self.hop

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def configs_at_bitrate(bitrate: float) -> list[MelGriffinLimConfig]:
    """Ways of spending ``bitrate`` bit/s: (frame rate, mel bins, bits per bin) splits,
    6.25–50 frames/s, 4–128 mel bins (none empty at ``n_fft=1024``), 1–4 bits per bin."""
    out = []
    for frame_rate in (6.25, 12.5, 25.0, 50.0):
        for bits in (1, 2, 3, 4):
            n_mels = bitrate / (frame_rate * bits)
            if n_mels == int(n_mels) and 4 <= n_mels <= 128:
                out.append(MelGriffinLimConfig(frame_rate=frame_rate, n_mels=int(n_mels), bits=bits))
    return out


class MelGriffinLim:
    """Fit per-bin quantizers on training audio, then ``encode`` → ints, ``decode`` → waveform."""

    def __init__(self, config: MelGriffinLimConfig) -> None:
        import torchaudio.transforms as AT

        self.config = c = config
        self.mel = AT.MelSpectrogram(
            sample_rate=c.sample_rate, n_fft=c.n_fft, hop_length=c.hop, n_mels=c.n_mels, power=2.0
        )
        self.inverse_mel = AT.InverseMelScale(
            n_stft=c.n_fft // 2 + 1, n_mels=c.n_mels, sample_rate=c.sample_rate
        )
        self.griffin_lim = AT.GriffinLim(
            n_fft=c.n_fft, hop_length=c.hop, power=2.0, n_iter=c.griffin_lim_iters
        )
        self.edges: Tensor | None = None  # (n_mels, 2**bits - 1) inner cell boundaries
        self.values: Tensor | None = None  # (n_mels, 2**bits) reconstruction value per cell

    def _frames(self, wav: Tensor) -> Tensor:
        """(samples,) → log-mel frames (n_mels, frames) at ``frame_rate`` (averaged hops)."""
        logmel = torch.log(self.mel(wav) + 1e-8)  # (n_mels, hops)
        k = self.config.hops_per_frame
        pad = (-logmel.shape[-1]) % k
        logmel = F.pad(logmel, (0, pad), mode="replicate")
        return logmel.reshape(logmel.shape[0], -1, k).mean(-1)

    def fit(self, clips: list[Tensor]) -> MelGriffinLim:
        frames = torch.cat([self._frames(w) for w in clips], dim=1)  # (n_mels, N)
        cells = 2**self.config.bits
        qs = torch.linspace(0, 1, cells + 1)[1:-1]
        self.edges = torch.quantile(frames, qs, dim=1).T.contiguous()  # (n_mels, cells - 1)
        idx = self._bucket(frames)
        sums = torch.zeros(frames.shape[0], cells).scatter_add_(1, idx, frames)
        counts = torch.zeros(frames.shape[0], cells).scatter_add_(1, idx, torch.ones_like(frames))
        self.values = sums / counts.clamp_min(1)
        return self

    def _bucket(self, frames: Tensor) -> Tensor:
        return torch.stack([torch.bucketize(frames[b], self.edges[b]) for b in range(frames.shape[0])])

    def encode(self, wav: Tensor) -> Tensor:
        """(samples,) → cell indices (n_mels, frames), each in [0, 2**bits)."""
        if self.edges is None:
            raise ValueError(
                "MelGriffinLim.encode: call fit(training_clips) first to place the quantizer cells"
            )
        return self._bucket(self._frames(wav))

    def decode(self, codes: Tensor, samples: int) -> Tensor:
        """Cell indices → waveform of ``samples`` samples."""
        logmel = torch.gather(self.values, 1, codes)  # (n_mels, frames)
        hops = samples // self.config.hop + 1
        logmel = F.interpolate(logmel[None], size=hops, mode="linear", align_corners=False)[0]
        power = self.inverse_mel(logmel.exp())  # (bins, hops)
        wav = self.griffin_lim(power)
        return F.pad(wav, (0, max(0, samples - wav.numel())))[:samples]


def select_config(
    bitrate: float,
    fit_clips: list[Tensor],
    val_clips: list[Tensor],
    *,
    griffin_lim_iters: int = 16,
    seed: int = 0,
) -> tuple[MelGriffinLimConfig, list[dict[str, float | int]]]:
    """The split of ``bitrate`` with the lowest mean log-mel distance on ``val_clips``
    (quantizers fitted on ``fit_clips``; decoded with ``griffin_lim_iters`` iterations).

    Returns the chosen config (with the default iteration count) and one score row per
    split tried. Keep ``val_clips`` disjoint from the clips the baseline is scored on."""
    import torchaudio.transforms as AT

    from .codec import mel_distance

    configs = configs_at_bitrate(bitrate)
    if not configs:
        raise ValueError(
            f"select_config: bitrate={bitrate:g} bit/s has no split into 6.25/12.5/25/50 frames/s x "
            f"4..128 mel bins x 1..4 bits; use a bitrate one of them reaches (e.g. 200, 400, 800)"
        )
    if not fit_clips or not val_clips:
        raise ValueError("select_config: fit_clips and val_clips must each hold at least one clip")
    mel = AT.MelSpectrogram(
        sample_rate=configs[0].sample_rate, n_fft=1024, hop_length=256, n_mels=80, power=1.0
    )
    scores: list[dict[str, float | int]] = []
    for cfg in configs:
        trial = MelGriffinLim(replace(cfg, griffin_lim_iters=griffin_lim_iters)).fit(fit_clips)
        torch.manual_seed(seed)  # Griffin-Lim starts from a random phase
        dists = [
            float(mel_distance(mel(trial.decode(trial.encode(w), w.numel())), mel(w))) for w in val_clips
        ]
        scores.append({**cfg.to_dict(), "val_mel_distance": sum(dists) / len(dists)})
    best = min(range(len(configs)), key=lambda i: scores[i]["val_mel_distance"])
    return configs[best], scores
