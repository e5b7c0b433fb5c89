"""Command-line tools of the speech tokenizer, reached as ``tessera tokenizer VERB speech ...``.

    tessera tokenizer train speech --out runs/speech            # the shipped recipe
    tessera tokenizer train speech --out runs/speech --resume   # continue a killed run
    tessera tokenizer eval speech --checkpoint runs/speech/final
    tessera tokenizer encode speech clip.wav --out clip.ids.json
    tessera tokenizer decode speech clip.ids.json --out clip.decoded.wav [--levels 2]

``train`` shows a progress bar, appends JSONL metrics, writes example WAVs and
spectrogram PNGs every ``--sample-every`` steps, keeps a resumable state and exports the
trained tokenizer (config JSON + safetensors) to ``OUT/final``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ...core.tokenizer_cli import add_codec_verbs, decode_file, encode_file, load_tokenizer, with_overrides

__all__ = ["main", "build_parser"]


def _tokenizer(checkpoint: str | None):
    from . import SpeechTokenizer

    return load_tokenizer(SpeechTokenizer, checkpoint)


def cmd_train(args: argparse.Namespace) -> int:
    from . import SpeechTokenizer
    from .train import HELD_OUT_BASE, SpokenCorpus, TrainConfig, evaluate, train

    cfg = TrainConfig.debug() if args.preset == "debug" else TrainConfig.default()
    cfg = with_overrides(cfg, args, ("steps", "batch_size", "train_clips", "sample_every", "seed"))
    if args.adversarial:
        cfg = replace(cfg, adversarial=True)
    codec, _ = train(cfg, args.out, resume=args.resume, progress=not args.quiet)
    tok = SpeechTokenizer(cfg.codec, codec)
    tok.save(Path(args.out) / "final")
    report = evaluate(codec, SpokenCorpus.build(range(HELD_OUT_BASE, HELD_OUT_BASE + args.eval_clips)))
    print(json.dumps({"saved": str(Path(args.out) / "final"), "held_out": report}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import HELD_OUT_BASE, SpokenCorpus, evaluate

    tok = _tokenizer(args.checkpoint)
    corpus = SpokenCorpus.build(range(HELD_OUT_BASE, HELD_OUT_BASE + args.clips))
    report = evaluate(tok.codec, corpus, n_levels=args.levels)
    print(json.dumps(report, indent=2))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    tok = _tokenizer(args.checkpoint)
    ids, out, _ = encode_file(tok, args.input, args.out)
    print(f"{args.input}: {ids.numel()} tokens ({ids.numel() // tok.config.num_levels} frames) -> {out}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    tok = _tokenizer(args.checkpoint)
    wav, _, out, _ = decode_file(tok, args.input, args.out, default_suffix=".wav", levels=args.levels)
    print(f"{args.input}: {wav.numel() / tok.sample_rate:.2f} s -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera tokenizer ... speech", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    t = sub.add_parser("train", help="train the codec on the built-in spoken world")
    t.add_argument("--out", default="runs/speech", help="run folder (metrics, samples, state, final)")
    t.add_argument("--preset", choices=["default", "debug"], default="default")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--train-clips", type=int, help="spoken captions to train on (seeds 0..N-1)")
    t.add_argument("--sample-every", type=int, help="write example WAVs and spectrograms every N steps")
    t.add_argument("--seed", type=int)
    t.add_argument("--adversarial", action="store_true", help="add the spectrogram discriminator")
    t.add_argument("--resume", action="store_true", help="continue from OUT/state")
    t.add_argument("--eval-clips", type=int, default=16, help="held-out clips scored after training")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="mel distance, SI-SNR and code utilization on held-out speech")
    e.add_argument("--checkpoint", help="tokenizer folder (default: the shipped weights)")
    e.add_argument("--clips", type=int, default=32)
    e.add_argument("--levels", type=int, help="decode from the first K residual levels only")
    e.set_defaults(func=cmd_eval)
    _, d = add_codec_verbs(sub, media="audio file", encode=cmd_encode, decode=cmd_decode, decoded_suffix=".wav")
    d.add_argument("--levels", type=int, help="decode from the first K residual levels only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, getattr(args, "threads", 2)))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
