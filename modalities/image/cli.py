"""Command-line tools of the image tokenizer (``tessera tokenizer VERB image ...`` lands
here as ``main([VERB, ...])``):

    train   --data builtin|FOLDER --out DIR [--steps N ...]   train (resumes if DIR has a checkpoint)
    eval    [--checkpoint DIR] [--data builtin|FOLDER]          PSNR, SSIM, codebook use, token rates
    encode  [--checkpoint DIR] IMAGE [--out IDS.json]          image file -> local token ids
    decode  [--checkpoint DIR] IDS.json [--out IMAGE]           local token ids -> image file

Without ``--checkpoint`` the shipped built-in-world checkpoint is used.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tessera.core.tokenizer_cli import (
    add_codec_verbs,
    decode_file,
    encode_file,
    load_tokenizer,
    timed,
    with_overrides,
)

__all__ = ["main", "build_parser"]


def _load(checkpoint: str | None):  # -> ImageTokenizer
    from . import ImageTokenizer

    return load_tokenizer(ImageTokenizer, checkpoint)


def train_model_config(args: argparse.Namespace):  # -> ImageTokenizerConfig
    """The preset's config with the command line's quantizer, codebook size and image size;
    another quantizer brings its own default options and latent size."""
    from .model import DEFAULT_LATENT_DIM, ImageTokenizerConfig

    base = ImageTokenizerConfig.debug() if args.preset == "debug" else ImageTokenizerConfig.builtin()
    return ImageTokenizerConfig.from_dict(
        {
            **base.to_dict(),
            **({"quantizer": args.quantizer, "quantizer_options": None,
                "latent_dim": DEFAULT_LATENT_DIM[args.quantizer]}
               if args.quantizer and args.quantizer != base.quantizer else {}),
            **({"codebook_size": args.codebook_size, "quantizer_options": None} if args.codebook_size else {}),
            **({"image_size": [args.image_size, args.image_size]} if args.image_size else {}),
        }
    )


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    mc = train_model_config(args)
    names = ("data", "steps", "batch_size", "lr", "warmup_steps", "disc_weight", "disc_start", "train_images",
             "eval_every", "seed", "threads")
    train_config = with_overrides(TrainConfig.debug() if args.preset == "debug" else TrainConfig(), args, names)
    metrics = train(args.out, mc, train_config, progress=not args.no_progress)
    print(json.dumps({"out": str(Path(args.out) / "final"), **metrics}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import EVAL_SEED, builtin_images, evaluate, folder_images

    tok = _load(args.checkpoint)
    torch.set_num_threads(args.threads)
    c = tok.config
    if args.data == "builtin":
        images = builtin_images(args.count, start=EVAL_SEED, size=c.image_size)
        groups = [images]
    else:
        fitted = folder_images(args.data, side=min(c.image_size), multiple=c.factor, max_side=c.max_grid * c.factor)[: args.count]
        by_size: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for im in fitted:
            by_size.setdefault(tuple(im.shape), []).append(im)
        groups = [torch.stack(v) for v in by_size.values()]
    n = sum(g.shape[0] for g in groups)
    totals = {"psnr": 0.0, "ssim": 0.0}
    t_enc = t_dec = 0.0
    tokens = 0
    for g in groups:
        m = evaluate(tok.model, g)
        for k in totals:
            totals[k] += m[k] * g.shape[0]
        ids, enc = timed(tok.encode_batch, g)
        _, dec = timed(tok.decode_batch, ids)
        t_enc, t_dec = t_enc + enc, t_dec + dec
        tokens += ids.numel()
    usage = evaluate(tok.model, groups[0])
    pixels = sum(g.shape[0] * g.shape[2] * g.shape[3] for g in groups)
    report = {
        "images": n,
        "psnr": round(totals["psnr"] / n, 3),
        "ssim": round(totals["ssim"] / n, 4),
        "utilization": round(usage["utilization"], 4),
        "perplexity": round(usage["perplexity"], 1),
        "tokens_per_image": tokens / n,
        "bits_per_pixel": round((tokens - 2 * n) * math.log2(tok.model.quantizer.codebook_size) / pixels, 4),
        "encode_images_per_s": round(n / t_enc, 1),
        "decode_images_per_s": round(n / t_dec, 1),
        "fingerprint": tok.spec.fingerprint[:16],
    }
    print(json.dumps(report, indent=2))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    tok = _load(args.checkpoint)
    ids, out, seconds = encode_file(tok, args.input, args.out)
    grid, _ = tok.layout.unflatten(ids)
    h, w, f = grid["height"], grid["width"], tok.config.factor
    print(f"{args.input}: {h * f}x{w * f} -> {ids.numel()} tokens (grid {h}x{w} + 2 meta) "
          f"in {seconds * 1000:.1f} ms -> {out}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    tok = _load(args.checkpoint)
    image, ids, out, seconds = decode_file(tok, args.input, args.out, default_suffix=".png")
    print(f"{args.input}: {ids.numel()} tokens -> {image.shape[1]}x{image.shape[2]} in {seconds * 1000:.1f} ms -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera tokenizer VERB image", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="train an image tokenizer")
    t.add_argument("--data", default="builtin", help="'builtin' (the visual world) or a folder of images")
    t.add_argument("--out", required=True, help="run folder (resumes from DIR/checkpoint if present)")
    t.add_argument("--preset", choices=["builtin", "debug"], default="builtin")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--warmup-steps", type=int)
    t.add_argument("--quantizer", choices=["fsq", "vq"],
                   help="the bottleneck (default vq: 1024 codes, k-means init, rotation trick; see "
                        "modalities/image/weights/README.md); another one brings its own default options")
    t.add_argument("--codebook-size", type=int, help="codes in the quantizer (FSQ picks its levels for it)")
    t.add_argument("--image-size", type=int, help="square training crops of this side")
    t.add_argument("--disc-weight", type=float, help="adversarial loss weight (0 = no discriminator)")
    t.add_argument("--disc-start", type=int, help="step that switches the discriminator on")
    t.add_argument("--train-images", type=int, help="built-in world images to render for training")
    t.add_argument("--eval-every", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--threads", type=int)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="reconstruction metrics and token rates of a checkpoint")
    e.add_argument("--checkpoint", help="tokenizer folder (default: the shipped checkpoint)")
    e.add_argument("--data", default="builtin", help="'builtin' (held-out seeds) or a folder of images")
    e.add_argument("--count", type=int, default=256)
    e.add_argument("--threads", type=int, default=2)
    e.set_defaults(func=cmd_eval)

    add_codec_verbs(sub, media="image file", encode=cmd_encode, decode=cmd_decode, decoded_suffix=".png")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
