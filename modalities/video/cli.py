"""Command-line tools of the video tokenizer, reached as ``tessera tokenizer VERB video ...``.

    tessera tokenizer train video --out runs/video --half       # the shipped recipe (keyframe design)
    tessera tokenizer train video --preset causal --out runs/video3d     # the causal 3D design
    tessera tokenizer train video --out runs/video --resume     # continue a killed run
    tessera tokenizer export video --run runs/video --out DIR   # a run's latest state -> tokenizer
    tessera tokenizer export video --run runs/video --out DIR --half   # fp16 weights (as shipped)
    tessera tokenizer eval video --checkpoint runs/video/final
    tessera tokenizer encode video clip.mp4 --out clip.ids.json
    tessera tokenizer decode video clip.ids.json --out clip.decoded.gif

``train`` shows a progress bar, appends JSONL metrics (loss, PSNR, code utilization and
perplexity), writes reconstruction grids (PNG) every ``--sample-every`` steps, keeps a
resumable state and exports the trained tokenizer (config JSON + safetensors) to
``OUT/final``. ``eval`` prints held-out PSNR, utilization and clips/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ...core.tokenizer_cli import (
    add_codec_verbs,
    decode_file,
    encode_file,
    load_tokenizer,
    timed,
    with_overrides,
)

__all__ = ["main", "build_parser"]


def _tokenizer(checkpoint: str | None):
    from . import VideoTokenizer

    return load_tokenizer(VideoTokenizer, checkpoint)


def cmd_train(args: argparse.Namespace) -> int:
    from . import VideoTokenizer
    from .train import HELD_OUT_BASE, ClipCorpus, TrainConfig, evaluate, train

    presets = {"default": TrainConfig.default, "causal": TrainConfig.causal, "debug": TrainConfig.debug}
    cfg = presets[args.preset]()
    cfg = with_overrides(
        cfg, args,
        ("steps", "batch_size", "train_clips", "sample_every", "lr", "foreground_weight", "seed",
         "keyframe_checkpoint", "precision"),
    )
    t = time.time()
    model, _ = train(cfg, args.out, resume=args.resume, progress=not args.quiet)
    seconds = time.time() - t
    VideoTokenizer(cfg.model, model).save(Path(args.out) / "final", half=args.half)
    held_out = ClipCorpus.build(range(HELD_OUT_BASE, HELD_OUT_BASE + args.eval_clips), cfg.model)
    report = {
        "saved": str(Path(args.out) / "final"),
        "train_seconds": round(seconds, 1),
        "held_out": evaluate(model, held_out),
    }
    print(json.dumps(report, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run's latest saved state (``RUN/state``, written every ``ckpt_every``
    steps) as a tokenizer folder: a stopped or still-running training run becomes usable."""
    from ...core.checkpoint import load_json, load_tensors
    from . import VideoTokenizer
    from .model import build_video_model
    from .train import TrainConfig

    run = Path(args.run)
    cfg = TrainConfig.from_dict(load_json(run / "train_config.json"))
    step = load_json(run / "state" / "state.json")["step"]
    model = build_video_model(cfg.model)
    model.load_state_dict(load_tensors(run / "state" / "model.safetensors"))
    VideoTokenizer(cfg.model, model).save(args.out, half=args.half)
    print(f"{run}: state at step {step} of {cfg.steps} -> {args.out}{' (fp16 weights)' if args.half else ''}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import HELD_OUT_BASE, ClipCorpus, evaluate

    tok = _tokenizer(args.checkpoint)
    corpus = ClipCorpus.build(range(HELD_OUT_BASE, HELD_OUT_BASE + args.clips), tok.config)
    report = evaluate(tok.model, corpus)
    clips = corpus.clips(slice(0, 8))
    codes, enc = timed(tok.model.encode_codes, clips)
    _, dec = timed(tok.model.decode_codes, codes)
    report.update(
        encode_clips_per_s=round(len(clips) / enc, 2), decode_clips_per_s=round(len(clips) / dec, 2)
    )
    print(json.dumps(report, indent=2))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    tok = _tokenizer(args.checkpoint)
    ids, out, _ = encode_file(tok, args.input, args.out)
    c = tok.config
    grid = "x".join(map(str, c.grid))
    if c.design == "keyframe":
        grid = f"keyframe {'x'.join(map(str, c.keyframe_grid))} + motion {grid}"
    print(f"{args.input}: {ids.numel()} tokens ({grid}) -> {out}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    tok = _tokenizer(args.checkpoint)
    clip, _, out, _ = decode_file(tok, args.input, args.out, default_suffix=".gif")
    print(f"{args.input}: {clip.shape[0]} frames at {tok.config.fps:g} fps -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera tokenizer ... video", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    t = sub.add_parser("train", help="train the tokenizer on the built-in visual world")
    t.add_argument("--out", default="runs/video", help="run folder (metrics, samples, state, final)")
    t.add_argument(
        "--preset", choices=["default", "causal", "debug"], default="default",
        help="default: the shipped keyframe design (frame 0 as an image + motion ids, 512); causal: the "
        "causal 3D autoencoder (320 ids); debug: tiny",
    )
    t.add_argument(
        "--keyframe-checkpoint", help="image tokenizer folder that codes frame 0 (default preset; default: shipped)"
    )
    t.add_argument("--precision", choices=["fp32", "bf16"], help="bf16: autocast on the CPU")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--train-clips", type=int, help="world clips to train on (seeds 0..N-1)")
    t.add_argument("--sample-every", type=int, help="write reconstruction grids every N steps")
    t.add_argument("--lr", type=float)
    t.add_argument(
        "--foreground-weight", type=float, help="extra loss weight of pixels off the frame's dominant colour"
    )
    t.add_argument("--seed", type=int)
    t.add_argument("--resume", action="store_true", help="continue from OUT/state")
    t.add_argument("--half", action="store_true", help="save OUT/final with fp16 weights (half the file; as shipped)")
    t.add_argument("--eval-clips", type=int, default=64, help="held-out clips scored after training")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    t.set_defaults(func=cmd_train)
    x = sub.add_parser("export", help="a training run's latest state -> tokenizer folder")
    x.add_argument("--run", required=True, help="the run folder given to train --out")
    x.add_argument("--out", required=True, help="tokenizer folder to write (config JSON + safetensors)")
    x.add_argument("--half", action="store_true", help="store the weights in fp16 (half the file; the shipped weights)")
    x.set_defaults(func=cmd_export)
    e = sub.add_parser("eval", help="PSNR, code utilization and clips/s on held-out world clips")
    e.add_argument("--checkpoint", help="tokenizer folder (default: the shipped weights)")
    e.add_argument("--clips", type=int, default=64)
    e.add_argument("--threads", type=int, default=2)
    e.set_defaults(func=cmd_eval)
    add_codec_verbs(sub, media="GIF/MP4 file", encode=cmd_encode, decode=cmd_decode, decoded_suffix=".gif")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "threads"):
        torch.set_num_threads(max(1, args.threads))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
