"""Training recipe of the image tokenizer: L1 + L2 reconstruction, the quantizer's own
loss, and an optional PatchGAN discriminator (hinge loss, VQGAN's adaptive weight,
switched on after ``disc_start`` steps) — Esser et al. 2021, "Taming Transformers".

A run folder holds::

    config.json          model + training configs
    metrics.jsonl        one row per log step (loss, lr) and per evaluation (psnr, ssim, ...)
    samples/recon_*.png  originals (top row) over reconstructions (bottom row)
    samples/usage_*.png  codebook usage, codes sorted by count
    checkpoint/          resumable state (model, optimizer, rng; safetensors + JSON)
    final/               the trained tokenizer (``ImageTokenizer.load`` reads it)

Data: ``"builtin"`` renders ``train_images`` scenes of the visual world (seeds
``0..N-1``); evaluation always uses held-out seeds from ``EVAL_SEED``. A folder is read
recursively (PNG/JPEG/WebP/GIF), each image fitted by :func:`.io.fit_image` to the
shorter side of ``image_size`` and randomly cropped to ``image_size`` at every step.
Both get random flips.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tessera.core.checkpoint import save_json
from tessera.core.quantizers import code_stats
from tessera.core.training import (
    MetricsLog,
    check_at_least_one,
    load_training_state,
    save_training_state,
    seed_everything,
    warmup_cosine,
)
from torch import Tensor

from .io import IMAGE_EXTENSIONS, fit_image, load_image
from .model import ImageAutoencoder, ImageTokenizerConfig, PatchDiscriminator, hinge_d_loss

__all__ = [
    "TrainConfig",
    "train",
    "evaluate",
    "psnr",
    "ssim",
    "builtin_images",
    "folder_images",
    "EVAL_SEED",
]

EVAL_SEED = 1_000_000


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train (JSON-serialisable). ``disc_weight = 0`` trains without the discriminator."""

    data: str = "builtin"
    steps: int = 3700  # the defaults are the built-in recipe: 591-880 s on 2 idle cores (weights/README.md)
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.02
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    disc_weight: float = 0.0
    disc_start: int = 2000
    disc_lr: float = 2e-4
    train_images: int = 16384
    eval_images: int = 256
    eval_every: int = 925
    log_every: int = 25
    checkpoint_every: int = 925
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        check_at_least_one(self, ("steps", "batch_size", "train_images", "eval_images", "eval_every", "log_every",
                                  "checkpoint_every", "threads"))
        if self.lr <= 0 or self.disc_lr <= 0:
            raise ValueError(f"TrainConfig: lr={self.lr}, disc_lr={self.disc_lr}; learning rates must be > 0")
        if self.disc_weight < 0:
            raise ValueError(f"TrainConfig: disc_weight={self.disc_weight}; use 0 (off) or a positive weight")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def debug(cls) -> TrainConfig:
        """Seconds on a CPU: for tests and smoke runs."""
        return cls(steps=40, batch_size=16, lr=3e-3, warmup_steps=5, train_images=128, eval_images=16,
                   eval_every=40, log_every=10, checkpoint_every=40)


# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------
def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB of (B, 3, H, W) images in [0, 1] (capped at 100 dB)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)


def _gaussian_window(size: int, sigma: float) -> Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float32) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, y: Tensor, *, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM (Wang et al. 2004) of (B, 3, H, W) images in [0, 1]: gaussian window
    11/1.5, K1=0.01, K2=0.03, computed per channel on the valid region and averaged."""
    C1, C2 = 0.01**2, 0.03**2
    channels = x.shape[1]
    w = _gaussian_window(min(window, x.shape[-1], x.shape[-2]), sigma).to(x)[None, None].repeat(channels, 1, 1, 1)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=channels)

    x, y = x.float(), y.float()
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + C1) * (2 * sxy + C2)) / ((mx * mx + my * my + C1) * (sxx + syy + C2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def evaluate(model: ImageAutoencoder, images: Tensor, *, batch_size: int = 64) -> dict[str, Any]:
    """Tokenize and reconstruct ``images`` (N, 3, H, W): mean PSNR / SSIM, codebook
    utilization and perplexity, and the per-code counts (for the usage plot)."""
    was_training = model.training
    model.eval()
    p, s, codes = [], [], []
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size]
        idx = model.encode(x)
        recon = model.decode(idx)
        p.append(psnr(recon, x))
        s.append(ssim(recon, x))
        codes.append(idx.reshape(-1))
    model.train(was_training)
    stats = code_stats(torch.cat(codes), model.quantizer.codebook_size)
    return {
        "psnr": float(torch.cat(p).mean()),
        "ssim": float(torch.cat(s).mean()),
        "utilization": float(stats.utilization),
        "perplexity": float(stats.perplexity),
        "counts": stats.counts,
    }


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
def builtin_images(count: int, *, start: int = 0, size: tuple[int, int] = (64, 64), progress: bool = False) -> Tensor:
    """Render ``count`` visual-world images from seeds ``start, start+1, ...``."""
    from tessera.modalities.world.visual import image_example
    from tqdm import tqdm

    seeds = range(start, start + count)
    it = tqdm(seeds, desc="rendering", unit="img", leave=False) if progress else seeds
    return torch.stack([image_example(s, size=size) for s in it])


def folder_images(folder: str | os.PathLike, *, side: int, multiple: int, max_side: int) -> list[Tensor]:
    """Every image under ``folder`` (recursively), fitted by :func:`.io.fit_image`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--data {folder}: not a folder; pass a folder of images or 'builtin'")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"--data {folder}: no {'/'.join(IMAGE_EXTENSIONS)} files found; pass a folder of images")
    return [fit_image(load_image(p), side=side, multiple=multiple, max_side=max_side) for p in files]


class _Batches:
    """Random batches of ``image_size`` crops with random flips."""

    def __init__(self, images: Tensor | list[Tensor], size: tuple[int, int], generator: torch.Generator) -> None:
        self.images, self.size, self.g = images, size, generator

    def sample(self, batch_size: int) -> Tensor:
        picks = torch.randint(0, len(self.images), (batch_size,), generator=self.g).tolist()
        h, w = self.size
        out = []
        for i in picks:
            img = self.images[i]
            top = int(torch.randint(0, img.shape[1] - h + 1, (1,), generator=self.g))
            left = int(torch.randint(0, img.shape[2] - w + 1, (1,), generator=self.g))
            crop = img[:, top : top + h, left : left + w]
            flips = [d for d, bit in ((2, 0), (1, 1)) if int(torch.randint(0, 2, (1,), generator=self.g))]
            out.append(crop.flip(flips) if flips else crop)
        return torch.stack(out)


# ---------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------
def save_recon_grid(originals: Tensor, recons: Tensor, path: str | os.PathLike) -> None:
    """Originals (top row) over reconstructions (bottom row), as a PNG."""
    from .io import save_image

    top = torch.cat(list(originals), dim=2)
    bottom = torch.cat(list(recons.clamp(0, 1)), dim=2)
    save_image(torch.cat([top, bottom], dim=1), path)


def save_usage_plot(counts: Tensor, path: str | os.PathLike, *, title: str) -> None:
    """Bar chart of code counts sorted from most to least used (Pillow)."""
    from PIL import Image, ImageDraw

    k = counts.numel()
    width, height, top = max(256, min(k, 2048)), 160, 20
    order = counts.sort(descending=True).values
    bins = order.reshape(-1)[: (k // max(1, k // width)) * max(1, k // width)]
    bars = bins.reshape(-1, max(1, k // width)).mean(1) if k > width else bins
    peak = float(bars.max()) or 1.0
    im = Image.new("RGB", (width, height + top), "white")
    draw = ImageDraw.Draw(im)
    step = width / bars.numel()
    for i, v in enumerate(bars.tolist()):
        h = round(height * v / peak)
        draw.rectangle([round(i * step), height + top - h, max(round(i * step), round((i + 1) * step) - 1), height + top], fill=(40, 90, 200))
    draw.text((4, 4), title, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------
def _adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
    """VQGAN's balance: ||∇ rec|| / ||∇ adv|| at the decoder's last layer."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def train(
    out: str | os.PathLike,
    model_config: ImageTokenizerConfig,
    train_config: TrainConfig,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume, when ``out/checkpoint`` exists) and save ``out/final``; returns
    the final evaluation (psnr, ssim, utilization, perplexity, seconds)."""
    from tqdm import tqdm

    from . import ImageTokenizer

    tc, mc = train_config, model_config
    out = Path(out)
    torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    start_time = time.time()

    # 1. data
    if tc.data == "builtin":
        pool: Tensor | list[Tensor] = builtin_images(tc.train_images, size=mc.image_size, progress=progress)
        held_out = builtin_images(tc.eval_images, start=EVAL_SEED, size=mc.image_size)
    else:
        f = mc.factor
        images = folder_images(tc.data, side=min(mc.image_size), multiple=f, max_side=mc.max_grid * f)
        pool = [im for im in images if im.shape[1] >= mc.image_size[0] and im.shape[2] >= mc.image_size[1]]
        if not pool:
            raise ValueError(f"--data {tc.data}: no image is at least {mc.image_size} after fitting")
        centre = _Batches(pool, mc.image_size, torch.Generator().manual_seed(EVAL_SEED))
        held_out = centre.sample(min(tc.eval_images, len(pool)))
    batches = _Batches(pool, mc.image_size, torch.Generator().manual_seed(tc.seed))

    # 2. model, optimizers, resume
    model = ImageAutoencoder(mc)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.99), weight_decay=0.0)
    disc = PatchDiscriminator() if tc.disc_weight > 0 else None
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=tc.disc_lr, betas=(0.5, 0.9)) if disc is not None else None
    step = 0
    if (out / "checkpoint" / "state.json").is_file():
        step = load_training_state(out / "checkpoint", model, opt)["step"]
        if disc is not None and (out / "checkpoint" / "disc" / "state.json").is_file():
            load_training_state(out / "checkpoint" / "disc", disc, disc_opt)
        batches.g.manual_seed(tc.seed + step)
    save_json(out / "config.json", {"model": mc.to_dict(), "train": tc.to_dict()})

    # 3. loop
    log = MetricsLog(out / "metrics.jsonl")
    bar = tqdm(total=tc.steps, initial=step, desc="image tokenizer", unit="step", disable=not progress)
    model.train()
    while step < tc.steps:
        for group in opt.param_groups:
            group["lr"] = tc.lr * warmup_cosine(step, warmup=tc.warmup_steps, steps=tc.steps, floor=tc.min_lr_ratio)
        x = batches.sample(tc.batch_size)
        recon, q = model(x)
        rec_loss = tc.l1_weight * (recon - x).abs().mean() + tc.l2_weight * (recon - x).pow(2).mean()
        loss = rec_loss + q.loss
        use_disc = disc is not None and step >= tc.disc_start
        if use_disc:
            g_loss = -disc(recon).mean()
            loss = loss + tc.disc_weight * _adaptive_weight(rec_loss, g_loss, model.decoder.last_layer) * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if use_disc:
            d_loss = hinge_d_loss(disc(x), disc(recon.detach()))
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
        step += 1
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.steps:
            row = {"loss": float(loss.detach()), "rec_loss": float(rec_loss.detach()), "lr": opt.param_groups[0]["lr"]}
            if q.stats is not None:
                row["batch_utilization"] = float(q.stats.utilization)
            if use_disc:
                row["d_loss"] = float(d_loss)
            log.log(step, **row)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if step % tc.eval_every == 0 or step == tc.steps:
            metrics = evaluate(model, held_out)
            counts = metrics.pop("counts")
            log.log(step, **{f"eval_{k}": v for k, v in metrics.items()})
            bar.write(f"step {step}: psnr {metrics['psnr']:.2f} dB, ssim {metrics['ssim']:.4f}, "
                      f"utilization {metrics['utilization']:.3f}, perplexity {metrics['perplexity']:.0f}")
            model.eval()
            with torch.no_grad():
                shown = held_out[:8]
                save_recon_grid(shown, model.decode(model.encode(shown)), out / "samples" / f"recon_{step:06d}.png")
            model.train()
            if counts is not None:  # None for codebooks too large to count (> 2**20 codes)
                save_usage_plot(counts, out / "samples" / f"usage_{step:06d}.png",
                                title=f"step {step}: {int((counts > 0).sum())}/{counts.numel()} codes used")
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            save_training_state(out / "checkpoint", model, opt, step)
            if disc is not None:
                save_training_state(out / "checkpoint" / "disc", disc, disc_opt, step)
    bar.close()

    # 4. final
    model.eval()
    ImageTokenizer(mc, model=model).save(str(out / "final"))
    metrics = evaluate(model, held_out)
    metrics.pop("counts")
    metrics["seconds"] = round(time.time() - start_time, 1)
    log.log(step, **{f"final_{k}": v for k, v in metrics.items()})
    log.close()
    return metrics
