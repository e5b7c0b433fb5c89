"""Training and evaluation recipe for the speech codec on the built-in spoken world.

    corpus = SpokenCorpus.build(range(400))                 # eSpeak NG captions, 16 kHz
    codec, history = train(TrainConfig.default(), out="runs/speech")
    report = evaluate(codec, SpokenCorpus.build(HELD_OUT_SEEDS))

Training draws random one-second crops (random gain) from the spoken captions and
minimises :class:`~.codec.SpectralLoss` plus the quantizer's commitment loss with AdamW
and a cosine schedule. The first ``vq_warmup`` steps bypass the quantizer: a random
encoder's latents are nearly constant, and codebooks initialised on them collapse onto a
few codes; after the warm-up, k-means starts them from informative latents. With ``adversarial=True`` a small multi-resolution spectrogram
discriminator adds hinge and feature-matching losses (off by default: it roughly doubles
a CPU step). The loop writes JSONL metrics, example WAVs and spectrogram PNGs every
``sample_every`` steps, and a resumable training state every ``ckpt_every`` steps.
Held-out clips come from seeds no training run uses (:data:`HELD_OUT_BASE` upwards).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.checkpoint import load_tensors, save_tensors
from ...core.training import (
    MetricsLog,
    check_at_least_one,
    load_training_state,
    save_training_state,
    seed_everything,
    warmup_cosine,
)
from .codec import CodecConfig, SpectralLoss, SpeechCodec, mel_distance
from .synth import SAMPLE_RATE, caption_for_seed, spoken_clip

__all__ = [
    "HELD_OUT_BASE",
    "TrainConfig",
    "SpokenCorpus",
    "random_batch",
    "si_snr",
    "evaluate",
    "train",
    "spectrogram_png",
]

HELD_OUT_BASE = 1_000_000
"""Seeds from here on are never used for training (held-out evaluation speech)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run (JSON-serialisable). ``train_clips`` clips from seeds ``0..n-1``."""

    codec: CodecConfig = field(default_factory=CodecConfig)
    steps: int = 1200
    batch_size: int = 8
    segment_seconds: float = 1.0
    lr: float = 2e-3
    warmup: int = 50
    vq_warmup: int = 150  # first steps train a plain autoencoder (quantizer bypassed)
    weight_decay: float = 0.01
    train_clips: int = 400
    seed: int = 0
    mel_weight: float = 1.0
    wave_weight: float = 5.0
    adversarial: bool = False
    adv_weight: float = 0.1
    log_every: int = 10
    sample_every: int = 150
    ckpt_every: int = 50

    def __post_init__(self) -> None:
        check_at_least_one(self, ("steps", "batch_size", "train_clips", "log_every", "sample_every", "ckpt_every"))
        if self.segment_seconds * self.codec.sample_rate < self.codec.frame_samples:
            raise ValueError(
                f"TrainConfig.segment_seconds={self.segment_seconds} is shorter than one codec frame "
                f"({self.codec.frame_samples / self.codec.sample_rate:g} s); use at least that"
            )

    @property
    def segment_samples(self) -> int:
        n = int(self.segment_seconds * self.codec.sample_rate)
        return n - n % self.codec.frame_samples

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["codec"] = self.codec.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        codec = CodecConfig.from_dict(d.pop("codec", {}))
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(codec=codec, **d)

    @classmethod
    def default(cls) -> TrainConfig:
        """The recipe of the shipped checkpoint."""
        return cls()

    @classmethod
    def debug(cls) -> TrainConfig:
        """Seconds on a CPU: tiny codec, a handful of clips and steps."""
        return cls(
            codec=CodecConfig.debug(), steps=30, batch_size=4, segment_seconds=0.5, train_clips=6, vq_warmup=10,
            log_every=5, sample_every=30, ckpt_every=30,
        )  # fmt: skip


@dataclass
class SpokenCorpus:
    """Spoken built-in captions: waveforms (float32, 16 kHz) with their transcripts."""

    audio: list[Tensor]
    transcripts: list[str]
    seeds: list[int]

    @classmethod
    def build(cls, seeds: range | list[int], cache: str | os.PathLike | None = None) -> SpokenCorpus:
        """Synthesize clip ``s`` for every seed (reads/writes ``cache``, a safetensors file,
        when given: synthesis costs about 0.1 s per clip)."""
        seeds = [int(s) for s in seeds]
        if cache is not None and Path(cache).is_file():
            t = load_tensors(cache)
            if t["seeds"].tolist() == seeds:
                bounds = t["offsets"].tolist()
                audio = [t["audio"][a:b].clone() for a, b in zip(bounds[:-1], bounds[1:], strict=False)]
                return cls(audio=audio, transcripts=[caption_for_seed(s) for s in seeds], seeds=seeds)
        clips = [spoken_clip(s) for s in seeds]
        corpus = cls(audio=[c.audio for c in clips], transcripts=[c.transcript for c in clips], seeds=seeds)
        if cache is not None:
            offsets = torch.tensor([0] + [a.numel() for a in corpus.audio]).cumsum(0)
            save_tensors(
                cache, {"audio": torch.cat(corpus.audio), "offsets": offsets, "seeds": torch.tensor(seeds)}
            )
        return corpus

    @property
    def seconds(self) -> float:
        return sum(a.numel() for a in self.audio) / SAMPLE_RATE


def random_batch(corpus: SpokenCorpus, batch_size: int, samples: int, generator: torch.Generator) -> Tensor:
    """(batch_size, samples) random crops (zero-padded if a clip is shorter), random gain 0.5–1."""
    out = torch.zeros(batch_size, samples)
    picks = torch.randint(len(corpus.audio), (batch_size,), generator=generator).tolist()
    for row, i in enumerate(picks):
        clip = corpus.audio[i]
        if clip.numel() > samples:
            start = int(torch.randint(clip.numel() - samples + 1, (1,), generator=generator))
            clip = clip[start : start + samples]
        out[row, : clip.numel()] = clip
    gain = 0.5 + 0.5 * torch.rand(batch_size, 1, generator=generator)
    return out * gain


def si_snr(estimate: Tensor, reference: Tensor) -> Tensor:
    """Scale-invariant signal-to-noise ratio in dB (higher is better) of 1-D signals."""
    est = estimate.double() - estimate.double().mean()
    ref = reference.double() - reference.double().mean()
    target = (est @ ref) / (ref @ ref).clamp_min(1e-12) * ref
    noise = est - target
    return (10 * torch.log10((target @ target).clamp_min(1e-12) / (noise @ noise).clamp_min(1e-12))).float()


def evaluate(codec: SpeechCodec, corpus: SpokenCorpus, *, n_levels: int | None = None) -> dict[str, Any]:
    """Mel distance, SI-SNR and per-level code utilization over whole clips."""
    import torchaudio.transforms as AT

    mel = AT.MelSpectrogram(sample_rate=SAMPLE_RATE, n_fft=1024, hop_length=256, n_mels=80, power=1.0)
    c = codec.config
    k = n_levels or c.num_levels
    was_training = codec.training
    codec.eval()
    counts = torch.zeros(c.num_levels, c.codebook_size)
    mels, snrs = [], []
    with torch.no_grad():
        for wav in corpus.audio:
            codes = codec.encode_codes(wav[None])[0]  # (F, L)
            counts += F.one_hot(codes, c.codebook_size).sum(0).float()
            recon = codec.decode_codes(codes[None, :, :k])[0, : wav.numel()]
            mels.append(float(mel_distance(mel(recon), mel(wav))))
            snrs.append(float(si_snr(recon, wav)))
    codec.train(was_training)
    util = ((counts > 0).float().mean(1)).tolist()
    return {
        "levels": k,
        "mel_distance": sum(mels) / len(mels),
        "si_snr": sum(snrs) / len(snrs),
        "utilization": util,
        "min_utilization": min(util),
        "clips": len(corpus.audio),
    }


class SpectrogramDiscriminator(nn.Module):
    """Small 2-D conv discriminators on log-magnitude STFTs at three resolutions."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.resolutions = ((512, 128), (1024, 256), (256, 64))
        self.nets = nn.ModuleList(
            nn.ModuleList(
                [
                    nn.Conv2d(1, channels, (3, 9), padding=(1, 4)),
                    nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), padding=(1, 4)),
                    nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), padding=(1, 4)),
                    nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)),
                ]
            )
            for _ in self.resolutions
        )

    def forward(self, wav: Tensor) -> list[list[Tensor]]:
        """Per resolution: the feature maps of every layer, the logits last."""
        out = []
        for (n_fft, hop), layers in zip(self.resolutions, self.nets, strict=False):
            spec = torch.stft(
                wav, n_fft, hop, window=torch.hann_window(n_fft, device=wav.device), return_complex=True
            )
            h = torch.log1p(spec.abs()).transpose(1, 2)[:, None]  # (B, 1, frames, bins)
            feats = []
            for i, layer in enumerate(layers):
                h = layer(h)
                if i < len(layers) - 1:
                    h = F.leaky_relu(h, 0.1)
                feats.append(h)
            out.append(feats)
        return out


def _discriminator_loss(disc: SpectrogramDiscriminator, fake: Tensor, real: Tensor) -> Tensor:
    """Hinge loss of the discriminator (the fake is detached)."""
    d_real, d_fake = disc(real), disc(fake.detach())
    return sum(F.relu(1 - r[-1]).mean() + F.relu(1 + f[-1]).mean() for r, f in zip(d_real, d_fake, strict=True))


def _generator_loss(disc: SpectrogramDiscriminator, fake: Tensor, real: Tensor) -> Tensor:
    """Hinge generator loss plus L1 feature matching (call after the discriminator step)."""
    with torch.no_grad():
        d_real = disc(real)
    g_fake = disc(fake)
    adv = sum(-f[-1].mean() for f in g_fake)
    fm = sum(
        F.l1_loss(gf, rf)
        for gr, rr in zip(g_fake, d_real, strict=True)
        for gf, rf in zip(gr[:-1], rr[:-1], strict=True)
    )
    return adv + fm


def spectrogram_png(wav: Tensor, path: str | os.PathLike, *, n_fft: int = 512, hop: int = 128) -> None:
    """Write a log-magnitude spectrogram (low frequencies at the bottom) as a grey PNG."""
    from PIL import Image

    spec = torch.stft(wav.float(), n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs()
    db = 20 * torch.log10(spec.clamp_min(1e-5))
    db = (db - db.max() + 80).clamp(0, 80) / 80  # 80 dB of range
    img = (db.flip(0) * 255).to(torch.uint8).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, mode="L").save(path)


def _write_samples(codec: SpeechCodec, corpus: SpokenCorpus, folder: Path, n: int = 2) -> None:
    from .io import write_audio

    was_training = codec.training
    codec.eval()
    with torch.no_grad():
        for i, wav in enumerate(corpus.audio[:n]):
            recon = codec.decode_codes(codec.encode_codes(wav[None]))[0, : wav.numel()].clamp(-1, 1)
            write_audio(wav, folder / f"{i}_input.wav", sample_rate=SAMPLE_RATE)
            write_audio(recon, folder / f"{i}_decoded.wav", sample_rate=SAMPLE_RATE)
            spectrogram_png(wav, folder / f"{i}_input.png")
            spectrogram_png(recon, folder / f"{i}_decoded.png")
    codec.train(was_training)


def train(
    cfg: TrainConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    corpus: SpokenCorpus | None = None,
    progress: bool = True,
) -> tuple[SpeechCodec, list[dict[str, Any]]]:
    """Train a codec; returns it (eval mode) and the logged metric rows.

    ``out`` receives ``metrics.jsonl``, ``samples/step_N/`` (WAVs + PNGs), ``state/``
    (resumable) and ``train_config.json``. ``resume=True`` continues from ``out/state``."""
    from tqdm import tqdm

    from ...core.checkpoint import save_json

    out = Path(out)
    state_dir = out / "state"
    if resume and not (state_dir / "state.json").is_file():
        raise FileNotFoundError(f"--resume: {state_dir}/state.json does not exist; start without --resume")
    seed_everything(cfg.seed)
    save_json(out / "train_config.json", cfg.to_dict())
    if corpus is None:
        corpus = SpokenCorpus.build(range(cfg.train_clips), cache=out / "corpus.safetensors")
    codec = SpeechCodec(cfg.codec)
    loss_fn = SpectralLoss(cfg.codec.sample_rate, mel_weight=cfg.mel_weight, wave_weight=cfg.wave_weight)
    opt = torch.optim.AdamW(codec.parameters(), lr=cfg.lr, betas=(0.8, 0.99), weight_decay=cfg.weight_decay)
    disc = SpectrogramDiscriminator() if cfg.adversarial else None
    disc_opt = (
        torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(0.8, 0.99)) if disc is not None else None
    )
    start = 0
    if resume:
        start = load_training_state(state_dir, codec, opt)["step"]
        if disc is not None:
            load_training_state(out / "disc_state", disc, disc_opt)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + start)
    codec.train()
    history: list[dict[str, Any]] = []
    bar = tqdm(
        range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="speech codec"
    )
    with MetricsLog(out / "metrics.jsonl") as log:
        for step in bar:
            lr = cfg.lr * warmup_cosine(step, warmup=cfg.warmup, steps=cfg.steps, floor=0.05)
            for g in opt.param_groups:
                g["lr"] = lr
            wav = random_batch(corpus, cfg.batch_size, cfg.segment_samples, gen)
            recon, q = codec(wav, quantize=step >= cfg.vq_warmup)
            rec_loss, terms = loss_fn(recon, wav)
            loss = rec_loss if q is None else rec_loss + q.loss
            if disc is not None:
                d_loss = _discriminator_loss(disc, recon, wav)
                disc_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                disc_opt.step()
                loss = loss + cfg.adv_weight * _generator_loss(disc, recon, wav)
                terms["disc"] = d_loss.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=list(codec.parameters()))
            nn.utils.clip_grad_norm_(codec.parameters(), 1.0)
            opt.step()
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                row = {"loss": float(loss.detach()), "lr": lr}
                row.update({k: float(v) for k, v in terms.items()})
                if q is not None:
                    row["commit"] = float(q.loss.detach())
                    row["utilization"] = float(q.stats.utilization)
                log.log(step + 1, **row)
                history.append({"step": step + 1, **row})
                bar.set_postfix(mel=f"{row['mel']:.3f}", stft=f"{row['stft']:.3f}")
            if (step + 1) % cfg.sample_every == 0 or step + 1 == cfg.steps:
                _write_samples(codec, corpus, out / "samples" / f"step_{step + 1}")
            if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
                save_training_state(state_dir, codec, opt, step + 1, extra={"config": cfg.to_dict()})
                if disc is not None:
                    save_training_state(out / "disc_state", disc, disc_opt, step + 1)
    codec.eval()
    return codec, history
