"""Tessera's first run: train a small image tokenizer on the built-in visual world for a
minute or two on a CPU, write a reconstruction grid, print PSNR. Offline; nothing is
downloaded.

    python -m tessera.apps.quickstart --out out/quickstart

Writes ``OUT/run/`` (metrics.jsonl, samples, checkpoint, final tokenizer) and
``OUT/reconstructions.png`` (held-out originals over their reconstructions).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tessera.apps.quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/quickstart", help="output folder")
    p.add_argument("--steps", type=int, default=300, help="training steps (300 ≈ 1-2 minutes on 2 idle cores)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch
    from tessera.modalities.image.model import ImageTokenizerConfig
    from tessera.modalities.image.train import EVAL_SEED, TrainConfig, builtin_images, save_recon_grid, train

    out = Path(args.out)
    if (out / "run").exists():
        shutil.rmtree(out / "run")  # a quickstart always starts from scratch
    config = ImageTokenizerConfig.builtin()
    tc = TrainConfig(steps=args.steps, batch_size=16, warmup_steps=min(30, args.steps), train_images=512,
                     eval_images=64, eval_every=max(1, args.steps // 3), checkpoint_every=args.steps, threads=args.threads)
    print(f"training a {config.grid[0]}x{config.grid[1]}-token image tokenizer ({config.codebook_size} codes) "
          f"on the built-in visual world for {args.steps} steps...")
    metrics = train(out / "run", config, tc)

    from tessera.modalities.image import ImageTokenizer

    tok = ImageTokenizer.load(str(out / "run" / "final"))
    images = builtin_images(8, start=EVAL_SEED, size=config.image_size)
    with torch.no_grad():
        recons = tok.decode_batch(tok.encode_batch(images))
    save_recon_grid(images, recons, out / "reconstructions.png")
    print(f"held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}, "
          f"codebook utilization {metrics['utilization']:.1%}, {metrics['seconds']:.0f} s")
    print(f"reconstructions: {out / 'reconstructions.png'}   tokenizer: {out / 'run' / 'final'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
