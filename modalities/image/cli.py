"""Command-line tools of the image tokenizer (``tessera tokenizer VERB image ...`` lands
here as ``main([VERB, ...])``):

    train   --data builtin|FOLDER --out DIR [--steps N ...]   train (resumes if DIR has a checkpoint)
    eval    [--checkpoint DIR] [--data builtin|FOLDER]          PSNR, SSIM, codebook use, token rates
    encode  [--checkpoint DIR] IMAGE --output IDS.json          image file -> local token ids
    decode  [--checkpoint DIR] IDS.json --output IMAGE           local token ids -> image file

Without ``--checkpoint`` the shipped built-in-world checkpoint is used.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

__all__ = ["main", "build_parser"]


def _load(checkpoint: str | None):  # -> ImageTokenizer
    from . import ImageTokenizer

    return ImageTokenizer.pretrained() if checkpoint is None else ImageTokenizer.load(checkpoint)


def cmd_train(args: argparse.Namespace) -> int:
    from .model import ImageTokenizerConfig
    from .train import TrainConfig, train

    base = ImageTokenizerConfig.debug() if args.preset == "debug" else ImageTokenizerConfig.builtin()
    model_config = ImageTokenizerConfig.from_dict(
        {
            **base.to_dict(),
            **({"quantizer": args.quantizer} if args.quantizer else {}),
            **({"codebook_size": args.codebook_size, "quantizer_options": {}} if args.codebook_size else {}),
            **({"image_size": [args.image_size, args.image_size]} if args.image_size else {}),
        }
    )
    tc = TrainConfig.debug() if args.preset == "debug" else TrainConfig()
    overrides = {
        "data": args.data,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "disc_weight": args.disc_weight,
        "disc_start": args.disc_start,
        "train_images": args.train_images,
        "eval_every": args.eval_every,
        "seed": args.seed,
        "threads": args.threads,
    }
    train_config = TrainConfig(**{**tc.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
    metrics = train(args.out, model_config, train_config, progress=not args.no_progress)
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
        t0 = time.perf_counter()
        ids = tok.encode_batch(g)
        t1 = time.perf_counter()
        tok.decode_batch(ids)
        t_enc, t_dec = t_enc + t1 - t0, t_dec + time.perf_counter() - t1
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
        "bits_per_pixel": round((tokens - 2 * n) * math.log2(c.codebook_size) / pixels, 4),
        "encode_images_per_s": round(n / t_enc, 1),
        "decode_images_per_s": round(n / t_dec, 1),
        "fingerprint": tok.spec.fingerprint[:16],
    }
    print(json.dumps(report, indent=2))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    tok = _load(args.checkpoint)
    image = tok.read(args.input)
    t0 = time.perf_counter()
    ids = tok.encode(image)
    seconds = time.perf_counter() - t0
    doc = {"modality": "image", "fingerprint": tok.spec.fingerprint, "ids": ids.tolist()}
    Path(args.output).write_text(json.dumps(doc) + "\n")
    h, w = image.shape[1:]
    print(f"{args.input}: {h}x{w} -> {ids.numel()} tokens (grid {h // tok.config.factor}x{w // tok.config.factor} "
          f"+ 2 meta) in {seconds * 1000:.1f} ms -> {args.output}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    tok = _load(args.checkpoint)
    path = Path(args.input)
    try:
        doc = json.loads(path.read_text())
        ids = torch.tensor(doc["ids"], dtype=torch.long)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not an ids file written by `encode` ({e}); expected JSON with an 'ids' list") from e
    fingerprint = tok.spec.fingerprint
    if doc.get("fingerprint") not in (None, fingerprint):
        raise ValueError(
            f"{path}: encoded by weights {doc['fingerprint'][:16]}…, but this checkpoint is {fingerprint[:16]}…; "
            f"decode with the checkpoint that encoded it (--checkpoint)"
        )
    t0 = time.perf_counter()
    image = tok.decode(ids)
    seconds = time.perf_counter() - t0
    tok.write(image, args.output)
    print(f"{path}: {ids.numel()} tokens -> {image.shape[1]}x{image.shape[2]} in {seconds * 1000:.1f} ms -> {args.output}")
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
    t.add_argument("--quantizer", choices=["fsq", "vq"])
    t.add_argument("--codebook-size", type=int)
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

    for verb, helptext, fn in (("encode", "image file -> ids JSON", cmd_encode), ("decode", "ids JSON -> image file", cmd_decode)):
        s = sub.add_parser(verb, help=helptext)
        s.add_argument("--checkpoint", help="tokenizer folder (default: the shipped checkpoint)")
        s.add_argument("input")
        s.add_argument("--output", required=True)
        s.set_defaults(func=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
