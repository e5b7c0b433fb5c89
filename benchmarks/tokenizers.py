"""Tokenizer figures (issue 5): the image section here; the speech and video sections come
from ``tokenizers_speech.py`` / ``tokenizers_video.py`` beside this file when present.

Image section, on the built-in visual world (held-out seeds) and on out-of-domain photos
(bundled with scikit-image and scikit-learn, fitted to a 128-pixel shorter side):

* the Tessera image tokenizer, trained from scratch with the built-in recipe (timed) or
  loaded with ``--checkpoint``: PSNR, SSIM, codebook utilization and perplexity, tokens
  per image, encode/decode throughput (images/s);
* a peer at equal bits and tokens: area-downsample by the same factor and quantize every
  pixel to a k-means palette of ``codebook_size`` colours learned on the same training
  images (one token per downsampled pixel), then bilinear upsampling; and the ratio.

    python benchmarks/tokenizers.py --quick                       # minutes: short training
    python benchmarks/tokenizers.py --json out/tokenizers.json    # full recipe (≤ 15 min idle)
    python benchmarks/tokenizers.py --checkpoint modalities/image/weights --json out/t.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tessera.modalities.image import ImageTokenizer
from tessera.modalities.image.io import fit_image
from tessera.modalities.image.model import ImageTokenizerConfig
from tessera.modalities.image.train import EVAL_SEED, TrainConfig, builtin_images, evaluate, psnr, ssim, train
from torch import Tensor

OOD_SIDE = 128


def ood_photos() -> dict[str, Tensor]:
    """The photos bundled with scikit-image and scikit-learn, as canonical images."""
    import numpy as np
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos: dict[str, Any] = {name: getattr(data, name)() for name in ("astronaut", "camera", "coffee", "chelsea")}
    sk = load_sample_images()
    photos.update({Path(f).stem: im for f, im in zip(sk.filenames, sk.images, strict=True)})
    out = {}
    for name, a in photos.items():
        a = np.asarray(a, dtype=np.float32) / 255.0
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        out[name] = torch.from_numpy(a[..., :3].copy()).permute(2, 0, 1).contiguous()
    return out


class PaletteBaseline:
    """Downsample by ``factor`` (area), one palette index per pixel, upsample (bilinear)."""

    def __init__(self, train_images: Tensor, factor: int, colours: int, seed: int = 0) -> None:
        from sklearn.cluster import MiniBatchKMeans

        small = F.avg_pool2d(train_images, factor)
        pixels = small.permute(0, 2, 3, 1).reshape(-1, 3)
        g = torch.Generator().manual_seed(seed)
        sample = pixels[torch.randperm(pixels.shape[0], generator=g)[: max(colours * 32, 65536)]]
        km = MiniBatchKMeans(n_clusters=colours, batch_size=4096, n_init=1, max_iter=30, random_state=seed)
        km.fit(sample.numpy())
        self.palette = torch.from_numpy(km.cluster_centers_).float()
        self.factor = factor

    def __call__(self, images: Tensor) -> Tensor:
        small = F.avg_pool2d(images, self.factor)
        B, _, h, w = small.shape
        flat = small.permute(0, 2, 3, 1).reshape(-1, 3)
        idx = torch.cdist(flat, self.palette).argmin(1)
        quant = self.palette[idx].reshape(B, h, w, 3).permute(0, 3, 1, 2)
        return F.interpolate(quant, scale_factor=self.factor, mode="bilinear", align_corners=False).clamp(0, 1)


def _items_per_s(fn: Any, n: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def run_image(quick: bool, *, checkpoint: str | None = None, out: str = "runs/bench_image", threads: int = 2) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    config = ImageTokenizerConfig.builtin()
    n_eval = 32 if quick else 256
    train_seconds = None
    if checkpoint is None:
        tc = TrainConfig(steps=60, batch_size=16, warmup_steps=10, train_images=256, eval_images=32,
                         eval_every=60, checkpoint_every=60, threads=threads) if quick else TrainConfig(threads=threads)
        train_seconds = train(out, config, tc, progress=not quick)["seconds"]
        checkpoint = str(Path(out) / "final")
    tok = ImageTokenizer.load(checkpoint)
    config = tok.config
    held_out = builtin_images(n_eval, start=EVAL_SEED, size=config.image_size)
    ours = evaluate(tok.model, held_out)
    batch = held_out[:64]
    ids = tok.encode_batch(batch)
    photos = {k: fit_image(v, side=OOD_SIDE, multiple=config.factor, max_side=OOD_SIDE * 2) for k, v in ood_photos().items()}
    ood = {k: float(psnr(tok.decode(tok.encode(v))[None], v[None])) for k, v in photos.items()}

    peer = PaletteBaseline(builtin_images(256 if quick else 1024, size=config.image_size), config.factor, config.codebook_size)
    peer_recon = peer(held_out)
    peer_psnr = float(psnr(peer_recon, held_out).mean())
    peer_ood = {k: float(psnr(peer(v[None]), v[None])) for k, v in photos.items()}

    tokens = ids.shape[1]
    rows: list[dict[str, Any]] = [
        {
            "section": "image",
            "name": f"tessera image tokenizer ({config.quantizer}, {config.codebook_size} codes, factor {config.factor})",
            "checkpoint": checkpoint,
            "psnr": round(ours["psnr"], 2),
            "ssim": round(ours["ssim"], 4),
            "utilization": round(ours["utilization"], 4),
            "perplexity": round(ours["perplexity"], 1),
            "tokens_per_item": tokens,
            "encode_items_per_s": round(_items_per_s(lambda: tok.encode_batch(batch), batch.shape[0]), 1),
            "decode_items_per_s": round(_items_per_s(lambda: tok.decode_batch(ids), batch.shape[0]), 1),
            "train_seconds": train_seconds,
            "ood_psnr": round(sum(ood.values()) / len(ood), 2),
            "ood_psnr_per_photo": {k: round(v, 2) for k, v in ood.items()},
        },
        {
            "section": "image",
            "name": f"peer: downsample x{config.factor} + {config.codebook_size}-colour k-means palette (equal bits/tokens)",
            "psnr": round(peer_psnr, 2),
            "ssim": round(float(ssim(peer_recon, held_out).mean()), 4),
            "tokens_per_item": tokens,
            "ood_psnr": round(sum(peer_ood.values()) / len(peer_ood), 2),
            "ood_psnr_per_photo": {k: round(v, 2) for k, v in peer_ood.items()},
        },
        {
            "section": "image",
            "name": "ratio tessera/peer",
            "psnr_gain_db": round(ours["psnr"] - peer_psnr, 2),
            "mse_ratio": round(10 ** (-(ours["psnr"] - peer_psnr) / 10), 4),
            "ood_psnr_gain_db": round(sum(ood.values()) / len(ood) - sum(peer_ood.values()) / len(peer_ood), 2),
        },
    ]
    checks = {
        "psnr >= 32 dB": ours["psnr"] >= 32.0,
        "utilization >= 95%": ours["utilization"] >= 0.95,
        "tokens <= 256 codes": tokens - 2 <= 256,  # 2 meta tokens (grid height, width) + the codes
    }
    if train_seconds is not None and not quick:
        checks["trained from scratch in <= 15 min"] = train_seconds <= 900
    rows.append({"section": "image", "name": "checks (issue 5 targets)", **checks})
    print(f"{'image tokenizer':<44}{'tessera':>10}{'peer':>10}{'ratio':>10}")
    for label, key in (("PSNR built-in world (dB)", "psnr"), ("PSNR photos, out of domain (dB)", "ood_psnr")):
        a, b = rows[0][key], rows[1][key]
        print(f"{label:<44}{a:10.2f}{b:10.2f}{10 ** ((b - a) / 10):9.3f}x  (our MSE / peer MSE)")
    print(f"{'SSIM':<44}{rows[0]['ssim']:10.4f}{rows[1]['ssim']:10.4f}")
    print(f"{'codebook utilization':<44}{rows[0]['utilization']:10.3f}")
    print(f"{'tokens per image':<44}{tokens:10d}{tokens:10d}")
    print(f"{'encode / decode images/s':<44}{rows[0]['encode_items_per_s']:>5.0f} / {rows[0]['decode_items_per_s']:<5.0f}")
    if train_seconds is not None:
        print(f"{'training seconds':<44}{train_seconds:10.0f}")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'MISS'}] {name}")
    return rows


def _sibling_section(name: str, quick: bool) -> list[dict[str, Any]]:
    path = Path(__file__).resolve().parent / f"tokenizers_{name}.py"
    if not path.is_file():
        return []
    spec = importlib.util.spec_from_file_location(f"_tessera_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run(quick)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short training, fewer held-out items (CI)")
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument("--checkpoint", help="evaluate this image tokenizer instead of training one")
    p.add_argument("--out", default="runs/bench_image", help="run folder for the from-scratch training")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sections", default="image,speech,video", help="comma-separated sections to run")
    args = p.parse_args(argv)
    sections = args.sections.split(",")
    rows: list[dict[str, Any]] = []
    if "image" in sections:
        rows += run_image(args.quick, checkpoint=args.checkpoint, out=args.out, threads=args.threads)
    for name in ("speech", "video"):
        if name in sections:
            rows += _sibling_section(name, args.quick)
    for row in rows:
        print(json.dumps(row))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
