"""Reconstruction metrics and picture grids that every visual tokenizer's training and
evaluation share (image, video, ...): PSNR per item, and a grid of images saved as PNG.

    psnr(recon, target)                 # (B,) dB, for tensors in [0, 1] of shape (B, ...)
    save_image_grid(rows, "grid.png")   # rows: (R, C, 3, H, W) in [0, 1]
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["psnr", "save_image_grid"]


def psnr(recon: Tensor, target: Tensor, *, peak: float = 1.0, eps: float = 1e-10) -> Tensor:
    """Peak signal-to-noise ratio in dB of each item of a batch ``(B, ...)`` (values in
    ``[0, peak]``; ``recon`` is clamped to that range first)."""
    if recon.shape != target.shape:
        raise ValueError(
            f"psnr: recon is {tuple(recon.shape)}, target is {tuple(target.shape)}; give equal shapes"
        )
    err = (recon.detach().float().clamp(0, peak) - target.detach().float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(peak**2 / (err + eps))


def save_image_grid(rows: Tensor, path: str | os.PathLike, *, pad: int = 2) -> None:
    """Save ``rows`` ``(R, C, 3, H, W)`` in [0, 1] as one PNG: R rows of C images, ``pad``
    white pixels apart."""
    from PIL import Image

    if rows.ndim != 5 or rows.shape[2] != 3:
        raise ValueError(f"save_image_grid: rows is {tuple(rows.shape)}, expected (rows, columns, 3, H, W)")
    R, C, _, H, W = rows.shape
    canvas = torch.ones(3, R * (H + pad) + pad, C * (W + pad) + pad)
    for r in range(R):
        for c in range(C):
            y, x = pad + r * (H + pad), pad + c * (W + pad)
            canvas[:, y : y + H, x : x + W] = rows[r, c].detach().float().clamp(0, 1)
    pixels = (canvas * 255).round().byte().permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
