"""Video section of the tokenizer benchmark: the shipped video tokenizer against a patch
k-means VQ at the same token layout and budget, on held-out clips of the built-in visual
world; prints a table (with our MSE / the peer's) and JSON rows.

Reported per method: tokens per clip, codebook size, PSNR (dB, mean over clips), L1,
code utilization (fraction of the codebook used over every held-out token) and
perplexity; for the tokenizer also encode and decode throughput (clips/s on
``--threads`` CPU threads) and the checker's motion accuracy on its reconstructions.

The peer: each token is one space-time patch of the tokenizer's own grid replaced by the
nearest of as many k-means centroids as the tokenizer has codes, fitted on patches of
training clips (seeds the held-out set never uses) — the same tokens, the same
vocabulary, no network. For the keyframe design (shipped): frame 0 as 4 × 4 patches
(the keyframe grid, one k-means of the keyframe codebook's size), then pairs of frames as
8 × 8 patches (the motion grid, one of the motion codebook's size); for the causal design,
the first frame alone then pairs of frames, 8 × 8 pixels. The ``checks`` row compares both and checks the issue's targets.

    python benchmarks/tokenizers_video.py --quick --json out/video.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

HELD_OUT_CLIPS = {True: 24, False: 128}
FIT_CLIPS = {True: 48, False: 256}
KMEANS_POINTS = {True: 8_000, False: 40_000}
MOTION_CLIPS = {True: 8, False: 32}


def _clips_per_s(fn: Any, n: int, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return n * repeats / (time.perf_counter() - t)


def _group_patches(frames: torch.Tensor, f: int, p: int) -> torch.Tensor:
    """(B, F, 3, H, W) → (B·(F/f)·(H/p)·(W/p), 3·f·p·p): groups of ``f`` frames cut into
    ``p × p`` patches."""
    from tessera.modalities.video.model import space_time_unshuffle

    x = space_time_unshuffle(frames.permute(0, 2, 1, 3, 4), f, p)
    return x.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[1])


def _ungroup_patches(patches: torch.Tensor, shape: tuple[int, ...], f: int, p: int) -> torch.Tensor:
    """Inverse of :func:`_group_patches` for frames of ``shape`` (B, F, 3, H, W)."""
    from tessera.modalities.video.model import space_time_shuffle

    B, F, _, H, W = shape
    x = patches.reshape(B, F // f, H // p, W // p, -1).permute(0, 4, 1, 2, 3)
    return space_time_shuffle(x, f, p).permute(0, 2, 1, 3, 4)


def _patches(clips: torch.Tensor, tf: int, p: int) -> torch.Tensor:
    """(B, T, 3, H, W) → (B·t·h·w, 3·tf·p·p) patches on the causal tokenizer's grid (the
    first frame alone: repeated ``tf`` times, as the causal network pads it)."""
    return _group_patches(torch.cat([clips[:, :1].expand(-1, tf - 1, -1, -1, -1), clips], dim=1), tf, p)


def _unpatch(patches: torch.Tensor, shape: tuple[int, ...], tf: int, p: int) -> torch.Tensor:
    """Inverse of :func:`_patches` (the repeats of the first frame dropped)."""
    B, T, C, H, W = shape
    return _ungroup_patches(patches, (B, T + tf - 1, C, H, W), tf, p)[:, tf - 1 :]


def run(quick: bool, *, checkpoint: str | None = None) -> list[dict[str, Any]]:
    """Rows of the video section (``quick``: fewer held-out clips, for CI)."""
    from tessera.core.metrics import psnr
    from tessera.core.quantizers import code_stats
    from tessera.core.quantizers.kmeans import kmeans, nearest_code
    from tessera.modalities.video import VideoTokenizer
    from tessera.modalities.video.train import HELD_OUT_BASE, ClipCorpus, evaluate
    from tessera.modalities.world.checker import check_video
    from tessera.modalities.world.visual import sample_video_scene

    tok = VideoTokenizer.pretrained() if checkpoint is None else VideoTokenizer.load(checkpoint)
    c = tok.config
    K = tok.model.codebook_size
    held_out = ClipCorpus.build(range(HELD_OUT_BASE, HELD_OUT_BASE + HELD_OUT_CLIPS[quick]), c)
    rows: list[dict[str, Any]] = []

    # 1. the tokenizer: quality, utilization, throughput, motion read back by the checker
    report = evaluate(tok.model, held_out)
    batch = held_out.clips(slice(0, 8))
    codes = tok.model.encode_codes(batch)
    enc = _clips_per_s(lambda: tok.model.encode_codes(batch), len(batch), 3)
    dec = _clips_per_s(lambda: tok.model.decode_codes(codes), len(batch), 3)
    motion = []
    for seed in held_out.seeds[: MOTION_CLIPS[quick]]:
        clip = held_out.clips(slice(held_out.seeds.index(seed), held_out.seeds.index(seed) + 1))[0]
        motion.append(check_video(tok.decode(tok.encode(clip)), sample_video_scene(seed))["motion"])
    rows.append(
        {
            "section": "video",
            "method": (
                f"keyframe {c.keyframe_grid[0]}x{c.keyframe_grid[1]} (image tokenizer) + motion VQ "
                f"({c.grid[0]}x{c.grid[1]}x{c.grid[2]})"
                if c.design == "keyframe"
                else f"causal 3D autoencoder + {c.quantizer.upper()} ({c.grid[0]}x{c.grid[1]}x{c.grid[2]})"
            ),
            "tokens_per_clip": c.tokens,
            "codebook_size": K,
            "psnr_db": round(report["psnr"], 2),
            # where the error is: the first frame (encoded alone) vs the frames after it
            "psnr_first_frame_db": report["psnr_per_frame"][0],
            "psnr_later_frames_db": round(sum(report["psnr_per_frame"][1:]) / (len(report["psnr_per_frame"]) - 1), 2),
            "l1": round(report["l1"], 4),
            "utilization": round(report["utilization"], 4),
            **{k: round(report[k], 4) for k in ("utilization_keyframe", "utilization_motion") if k in report},
            "perplexity": round(report["perplexity"], 1),
            "encode_clips_per_s": round(enc, 1),
            "decode_clips_per_s": round(dec, 1),
            "motion_accuracy": round(sum(motion) / len(motion), 3),
            "clips": report["clips"],
        }
    )

    # 2. the peer: patch k-means VQ with the same tokens and codebook size
    fit = ClipCorpus.build(range(FIT_CLIPS[quick]), c)  # training seeds, never the held-out ones
    clips = held_out.clips(slice(None))
    gen = torch.Generator().manual_seed(0)

    def codec(fit_points: torch.Tensor, points: torch.Tensor, codes: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """k-means of ``codes`` centroids on (a sample of) ``fit_points``; ``points`` replaced
        by their nearest centroid: (reconstructed points, assignments, fit seconds)."""
        fit_points = fit_points[torch.randperm(fit_points.shape[0], generator=gen)[: KMEANS_POINTS[quick]]]
        t = time.perf_counter()
        centroids, _ = kmeans(fit_points, codes, iters=8, generator=gen, sync=False)
        fit_s = time.perf_counter() - t
        assign = nearest_code(points, centroids)
        return centroids[assign], assign, fit_s

    if c.design == "keyframe":
        # the same layout: frame 0 as patches of the keyframe grid, then pairs of frames as
        # patches of the motion grid, each with as many centroids as the tokenizer has codes
        kp, tf, p = c.size[0] // c.keyframe_grid[0], c.time_factor, c.space_factor
        K_key = tok.model.keyframe_codes
        key_recon, key_assign, s1 = codec(_group_patches(fit.clips(slice(None))[:, :1], 1, kp), _group_patches(clips[:, :1], 1, kp), K_key)
        rest_recon, rest_assign, s2 = codec(
            _group_patches(fit.clips(slice(None))[:, 1:], tf, p), _group_patches(clips[:, 1:], tf, p), K - K_key
        )
        B, T, _, H, W = clips.shape
        recon = torch.cat(
            [_ungroup_patches(key_recon, (B, 1, 3, H, W), 1, kp), _ungroup_patches(rest_recon, (B, T - 1, 3, H, W), tf, p)],
            dim=1,
        )
        assign, fit_s = torch.cat([key_assign, rest_assign + K_key]), s1 + s2
        peer_name = f"patch k-means VQ (frame 0 {kp}x{kp}, then {tf}x{p}x{p} patches)"
    else:
        tf, p = c.time_factor, c.space_factor
        points, assign, fit_s = codec(_patches(fit.clips(slice(None)), tf, p), _patches(clips, tf, p), K)
        recon = _unpatch(points, tuple(clips.shape), tf, p)
        peer_name = f"patch k-means VQ ({tf}x{p}x{p} patches)"
    stats = code_stats(assign, K)
    rows.append(
        {
            "section": "video",
            "method": peer_name,
            "tokens_per_clip": c.tokens,
            "codebook_size": K,
            "psnr_db": round(float(psnr(recon, clips).mean()), 2),
            "l1": round(float((recon.clamp(0, 1) - clips).abs().mean()), 4),
            "utilization": round(float(stats.utilization), 4),
            "perplexity": round(float(stats.perplexity), 1),
            "fit_seconds": round(fit_s, 1),
            "clips": len(held_out),
        }
    )

    # 3. the targets, checked
    ours, peer = rows
    rows.append(
        {
            "section": "video",
            "method": "checks",
            "psnr_gain_over_peer_db": round(ours["psnr_db"] - peer["psnr_db"], 2),
            "psnr_at_least_28db": ours["psnr_db"] >= 28.0,
            "utilization_at_least_90pct": ours["utilization"] >= 0.9,
            "tokens_per_clip_at_most_512": ours["tokens_per_clip"] <= 512,
            "better_than_peer": ours["psnr_db"] > peer["psnr_db"],
            "mse_ratio_to_peer": round(10 ** (-(ours["psnr_db"] - peer["psnr_db"]) / 10), 4),
            **(
                {"note": f"--quick scores {len(held_out)} clips: utilization counts codes over fewer tokens, so "
                 f"judge the targets on the full run ({HELD_OUT_CLIPS[False]} clips)"}
                if quick else {}
            ),
        }
    )
    _print_table(rows)
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    ours, peer, checks = rows
    print(f"{'video tokenizer (' + str(ours['clips']) + ' held-out clips)':<44}{'tessera':>10}{'peer':>10}{'ratio':>10}")
    print(f"{'PSNR (dB)':<44}{ours['psnr_db']:10.2f}{peer['psnr_db']:10.2f}"
          f"{checks['mse_ratio_to_peer']:9.3f}x  (our MSE / peer MSE)")
    print(f"{'  first frame / later frames (dB)':<44}{ours['psnr_first_frame_db']:>5.1f} / {ours['psnr_later_frames_db']:<5.1f}")
    print(f"{'code utilization':<44}{ours['utilization']:10.3f}{peer['utilization']:10.3f}")
    if "utilization_motion" in ours:
        print(f"{'  keyframe / motion codebook':<44}{ours['utilization_keyframe']:>5.3f} / {ours['utilization_motion']:<5.3f}")
    print(f"{'tokens per clip / codebook':<44}{ours['tokens_per_clip']:>5d} / {ours['codebook_size']:<5d}")
    print(f"{'encode / decode clips/s':<44}{ours['encode_clips_per_s']:>5.1f} / {ours['decode_clips_per_s']:<5.1f}")
    print(f"{'checker motion accuracy':<44}{ours['motion_accuracy']:10.3f}")
    for key in ("psnr_at_least_28db", "utilization_at_least_90pct", "tokens_per_clip_at_most_512", "better_than_peer"):
        print(f"  [{'ok' if checks[key] else 'MISS'}] {key}")
    if "note" in checks:
        print(f"  note: {checks['note']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{HELD_OUT_CLIPS[True]} held-out clips instead of {HELD_OUT_CLIPS[False]}",
    )
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--checkpoint", help="video tokenizer folder (default: the shipped weights)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.quick, checkpoint=args.checkpoint)
    for row in rows:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
