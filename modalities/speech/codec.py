"""A small convolutional neural audio codec with residual vector quantization.

The SoundStream / EnCodec / SNAC family (SNAC: "Multi-Scale Neural Audio Codec",
Siuzdak et al. 2024), sized to train on a CPU and to decode 20x faster than real time:

    waveform (B, T) 16 kHz
      │ strided conv on the waveform (kernel 4·hop, stride hop = 160): a learned filterbank, 100 Hz
      │ signed log compression, ConvNeXt blocks at 100 Hz
      │ strided conv (stride 4) → 25 Hz, ConvNeXt blocks, linear → latent (B, F, D)
      │ residual VQ (tessera.core.quantizers.residual): num_levels codes per frame
      │ linear, ConvNeXt blocks at 25 Hz, transposed conv (stride 4) → 100 Hz, ConvNeXt blocks
      │ linear head → log-magnitude and phase of a 640-point STFT (hop 160)
      ▼ inverse STFT (the Vocos head: cheap, no upsampling stack at 16 kHz)
    waveform (B, F · 640)

**Frame rate and levels: 25 Hz × 4 levels of 256 codes = 100 tokens/s, 800 bit/s.** The
LLM budget is at most 100 tokens per second; 25 Hz is about the phoneme rate of speech,
and spending the budget on four residual levels instead of two (50 Hz × 2) gives four
usable bitrates (200 / 400 / 600 / 800 bit/s) through quantizer dropout — the coarse
level alone still decodes to intelligible speech, the SNAC observation that coarse
content needs little temporal resolution. 256 codes per level keeps every code in use on
the built-in world (a few thousand frames per evaluation).

Losses (:class:`SpectralLoss`): log-magnitude and spectral-convergence distances at three
STFT resolutions plus a log-mel distance (torchaudio transforms) and an L1 waveform term;
the quantizer adds its own commitment loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.quantizers.base import QuantizerOutput

__all__ = ["CodecConfig", "SpeechCodec", "SpectralLoss", "ConvNeXtBlock", "mel_distance"]

# Mean and spread of log |STFT| (640-point Hann, natural log) of the built-in speech: the
# decoder head predicts standardised log-magnitudes, so an untrained head starts at the
# right loudness instead of 27x too loud, and Adam does not spend thousands of steps
# walking the output bias down to it.
LOG_MAG_MEAN = -3.3
LOG_MAG_STD = 2.6


@dataclass(frozen=True, kw_only=True)
class CodecConfig:
    """Hyper-parameters of :class:`SpeechCodec` (JSON-serialisable)."""

    sample_rate: int = 16_000
    hop: int = 160  # samples per analysis frame (100 Hz)
    downsample: int = 4  # analysis frames per token frame (25 Hz)
    channels: int = 128
    enc_blocks: int = 2  # ConvNeXt blocks at 100 Hz in the encoder
    mid_blocks: int = 1  # ConvNeXt blocks at the token rate, in encoder and decoder each
    dec_blocks: int = 3  # ConvNeXt blocks at 100 Hz in the decoder
    latent_dim: int = 64
    num_levels: int = 4
    codebook_size: int = 256
    quantizer_dropout: float = 0.3
    max_seconds: float = 15.0
    # every level: codes looked up in an 8-d linear projection (the low-dimensional lookup
    # of "Improved VQGAN", which keeps codebooks in use), EMA codebook, k-means init on the
    # first batch, codes below 0.25 tokens per batch restarted. Euclidean, not cosine: the
    # latents share a large common offset that a unit-norm lookup would squash together.
    vq_kwargs: dict[str, Any] = field(
        default_factory=lambda: {
            "codebook_dim": 8,
            "decay": 0.95,
            "kmeans_init": True,
            "restart_dead": True,
            "restart_threshold": 0.25,
        }
    )

    def __post_init__(self) -> None:
        for name in ("hop", "downsample", "channels", "latent_dim", "num_levels", "codebook_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CodecConfig.{name}={getattr(self, name)} must be >= 1")
        if self.downsample % 2:
            raise ValueError(
                f"CodecConfig.downsample={self.downsample} must be even (the strided conv pads half of it)"
            )
        if not 0.0 <= self.quantizer_dropout <= 1.0:
            raise ValueError(f"CodecConfig.quantizer_dropout={self.quantizer_dropout} must lie in [0, 1]")
        if self.max_seconds <= 0:
            raise ValueError(f"CodecConfig.max_seconds={self.max_seconds} must be > 0")

    @property
    def frame_samples(self) -> int:
        """Waveform samples per token frame (640 = 40 ms at 16 kHz)."""
        return self.hop * self.downsample

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_samples

    @property
    def n_fft(self) -> int:
        return 4 * self.hop

    @property
    def max_frames(self) -> int:
        return int(self.max_seconds * self.sample_rate) // self.frame_samples + 1

    @property
    def tokens_per_second(self) -> float:
        return self.frame_rate * self.num_levels

    @property
    def bitrate(self) -> float:
        """Bits per second at all levels."""
        return self.tokens_per_second * float(torch.log2(torch.tensor(float(self.codebook_size))))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodecConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"CodecConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    @classmethod
    def debug(cls) -> CodecConfig:
        """Tiny model for tests and smoke runs (seconds on a CPU)."""
        return cls(
            channels=32,
            enc_blocks=1,
            mid_blocks=1,
            dec_blocks=1,
            latent_dim=16,
            codebook_size=32,
            max_seconds=4.0,
        )


class ConvNeXtBlock(nn.Module):
    """Depthwise conv (k=7) → LayerNorm → pointwise MLP → layer-scaled residual, on (B, C, T)."""

    def __init__(self, dim: int, mult: int = 2) -> None:
        super().__init__()
        self.dw = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, mult * dim)
        self.down = nn.Linear(mult * dim, dim)
        self.scale = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.dw(x).transpose(1, 2))  # (B, T, C)
        h = self.down(F.gelu(self.up(h))) * self.scale
        return x + h.transpose(1, 2)


class SpeechCodec(nn.Module):
    """Encoder → residual VQ → decoder. Waveforms are (B, T) float in [-1, 1]."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        from ...core.quantizers.residual import ResidualQuantizer

        self.config = c = config
        C, hop, ds = c.channels, c.hop, c.downsample
        # encoder
        self.analysis = nn.Conv1d(1, C, kernel_size=4 * hop, stride=hop, padding=3 * hop // 2)
        self.enc_fast = nn.Sequential(*[ConvNeXtBlock(C) for _ in range(c.enc_blocks)])
        self.down = nn.Conv1d(C, C, kernel_size=2 * ds, stride=ds, padding=ds // 2)
        self.enc_slow = nn.Sequential(*[ConvNeXtBlock(C) for _ in range(c.mid_blocks)])
        # no LayerNorm before the latent or the head: per-frame normalisation over channels
        # would erase each frame's loudness, the first thing the decoder needs
        self.enc_out = nn.Linear(C, c.latent_dim)
        # quantizer
        self.quantizer = ResidualQuantizer(
            c.latent_dim,
            c.num_levels,
            codebook_size=c.codebook_size,
            kind="vq",
            quantizer_dropout=c.quantizer_dropout,
            **c.vq_kwargs,
        )
        # decoder
        self.dec_in = nn.Linear(c.latent_dim, C)
        self.dec_slow = nn.Sequential(*[ConvNeXtBlock(C) for _ in range(c.mid_blocks)])
        self.up = nn.ConvTranspose1d(C, C, kernel_size=2 * ds, stride=ds, padding=ds // 2)
        self.dec_fast = nn.Sequential(*[ConvNeXtBlock(C) for _ in range(c.dec_blocks)])
        self.head = nn.Linear(C, 2 * (c.n_fft // 2 + 1))
        self.register_buffer("window", torch.hann_window(c.n_fft), persistent=False)

    # ---- shapes ----------------------------------------------------------------
    def num_frames(self, samples: int) -> int:
        """Token frames for ``samples`` waveform samples (the last frame zero-padded)."""
        return -(-samples // self.config.frame_samples)

    def pad(self, wav: Tensor) -> Tensor:
        """Zero-pad (B, T) on the right to a whole number of token frames."""
        extra = self.num_frames(wav.shape[-1]) * self.config.frame_samples - wav.shape[-1]
        return F.pad(wav, (0, extra))

    # ---- encoder / decoder -------------------------------------------------------
    def encode_latent(self, wav: Tensor) -> Tensor:
        """(B, T) with T a multiple of ``frame_samples`` → latent (B, F, D)."""
        h = self.analysis(wav[:, None])  # (B, C, T / hop)
        h = torch.sign(h) * torch.log1p(h.abs())
        h = self.enc_slow(self.down(self.enc_fast(h)))  # (B, C, F)
        return self.enc_out(h.transpose(1, 2))  # (B, F, D)

    def decode_latent(self, z: Tensor) -> Tensor:
        """Latent (B, F, D) → waveform (B, F * frame_samples)."""
        c = self.config
        h = self.dec_slow(self.dec_in(z).transpose(1, 2))  # (B, C, F)
        h = self.dec_fast(self.up(h))  # (B, C, F * downsample)
        raw_mag, phase = self.head(h.transpose(1, 2)).float().chunk(2, dim=-1)  # (B, F', n_fft/2+1) each
        log_mag = LOG_MAG_MEAN + LOG_MAG_STD * raw_mag  # a unit-scale output spans speech's range
        spec = torch.polar(log_mag.clamp(max=6.0).exp(), phase).transpose(1, 2)  # (B, bins, F')
        wav = torch.istft(
            spec, n_fft=c.n_fft, hop_length=c.hop, window=self.window, center=True, length=h.shape[-1] * c.hop
        )
        return wav

    def forward(
        self, wav: Tensor, n_levels: int | None = None, *, quantize: bool = True
    ) -> tuple[Tensor, QuantizerOutput | None]:
        """(B, T) → reconstruction (B, T) and the quantizer's output (indices (B, F, L)).

        ``quantize=False`` bypasses the quantizer (a plain autoencoder): the training
        warm-up, so that the codebooks are k-means-initialised on informative latents
        instead of on a random encoder's near-constant output."""
        T = wav.shape[-1]
        z = self.encode_latent(self.pad(wav))
        if not quantize:
            return self.decode_latent(z)[:, :T], None
        q = self.quantizer(z, n_levels=n_levels)
        return self.decode_latent(q.quantized)[:, :T], q

    @torch.no_grad()
    def encode_codes(self, wav: Tensor) -> Tensor:
        """(B, T) → codes (B, F, num_levels)."""
        return self.quantizer.encode(self.encode_latent(self.pad(wav)))

    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        """Codes (B, F, k) for the first ``k <= num_levels`` levels → waveform (B, F * frame_samples)."""
        return self.decode_latent(self.quantizer.decode(codes))


class SpectralLoss(nn.Module):
    """Multi-resolution STFT + log-mel + waveform distances between (B, T) waveforms.

    The STFT term is log-magnitude L1 plus spectral convergence at two resolutions
    (512/128 and 1024/256); the mel term is the log-mel L1 of 80 bands computed from the
    1024-point magnitudes (the evaluation's mel distance). Returns the weighted total and
    each unweighted term (for logging)."""

    RESOLUTIONS = ((512, 128), (1024, 256))

    def __init__(
        self, sample_rate: int = 16_000, *, mel_weight: float = 1.0, wave_weight: float = 1.0
    ) -> None:
        super().__init__()
        import torchaudio.transforms as AT

        self.stfts = nn.ModuleList(
            AT.Spectrogram(n_fft=n, hop_length=h, power=1.0, window_fn=torch.hann_window)
            for n, h in self.RESOLUTIONS
        )
        self.mel_scale = AT.MelScale(
            n_mels=80, sample_rate=sample_rate, n_stft=self.RESOLUTIONS[-1][0] // 2 + 1
        )
        self.mel_weight, self.wave_weight = mel_weight, wave_weight

    def forward(self, pred: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        pred, target = pred.float(), target.float()
        stft = pred.new_zeros(())
        for s in self.stfts:
            p, t = s(pred), s(target)
            log_l1 = (torch.log(p + 1e-5) - torch.log(t + 1e-5)).abs().mean()
            sc = torch.linalg.norm(t - p) / torch.linalg.norm(t).clamp_min(1e-5)
            stft = stft + (log_l1 + sc) / len(self.stfts)
        mel = mel_distance(self.mel_scale(p), self.mel_scale(t))  # p, t: the 1024-point magnitudes
        wave = (pred - target).abs().mean()
        total = stft + self.mel_weight * mel + self.wave_weight * wave
        return total, {"stft": stft.detach(), "mel": mel.detach(), "wave": wave.detach()}


def mel_distance(pred_mel: Tensor, target_mel: Tensor) -> Tensor:
    """Mean absolute difference of log-mel spectrograms (natural log, floor 1e-5)."""
    return (torch.log(pred_mel.clamp_min(1e-5)) - torch.log(target_mel.clamp_min(1e-5))).abs().mean()
