"""Residual quantization (Lee et al., "Autoregressive Image Generation using Residual
Quantization", RQ-VAE, 2022; Zeghidour et al., SoundStream, 2021, for quantizer dropout).

Level 0 quantizes the input, level ``l`` quantizes what the levels before it left over;
the output is the sum of the level outputs, and the indices are ``(..., num_levels)``,
coarsest level first. Any prefix of the levels is a valid, coarser code:
``decode(indices[..., :k])`` reconstructs from the first ``k`` levels, and
``forward(x, n_levels=k)`` quantizes with only those. Quantizer dropout (training only)
keeps a random number of levels per batch element, so the prefixes learn to stand alone;
dropped levels get index ``-1`` and contribute zero.

``kind="vq"`` stacks :class:`~.vq.VectorQuantizer` levels (each gets ``inner_kwargs``).
``kind="fsq"`` stacks :class:`~.fsq.FSQ` levels (symmetric, hard-clamped) behind one shared
projection and a ``tanh`` bound: level ``l`` sees the residual scaled up by
``(L - 1)**l`` per channel, since a symmetric FSQ level of ``L`` values leaves a residual
of at most ``1 / (L - 1)``, so every level works on the full ``[-1, 1]`` range.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .base import Quantizer, QuantizerOutput, check_input, fp32_math, multi_code_stats
from .fsq import FSQ
from .vq import VectorQuantizer

__all__ = ["ResidualQuantizer"]


class ResidualQuantizer(Quantizer):
    """``num_levels`` quantizers applied to successive residuals.

    Args:
        dim: input channels.
        num_levels: number of residual levels (``num_codebooks``).
        codebook_size: codes per level (``kind="vq"``; for ``"fsq"`` it picks
            ``FSQ.recommended_levels(codebook_size)`` when ``levels`` is not given).
        kind: ``"vq"`` or ``"fsq"``.
        levels: FSQ levels per channel (``kind="fsq"``).
        quantizer_dropout: training only: the probability that a batch element keeps a
            uniformly drawn number ``1..num_levels`` of levels instead of all of them.
        dropout_per: ``"element"`` (default; SoundStream draws per example) or ``"batch"``
            (one draw for the whole batch, as vector-quantize-pytorch's ``ResidualVQ``).
        **inner_kwargs: passed to every level's constructor.
    """

    def __init__(
        self,
        dim: int,
        num_levels: int,
        *,
        codebook_size: int | None = None,
        kind: Literal["vq", "fsq"] = "vq",
        levels: Sequence[int] | None = None,
        quantizer_dropout: float = 0.0,
        dropout_per: Literal["element", "batch"] = "element",
        **inner_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"ResidualQuantizer: dim is {dim!r}, expected a positive integer")
        if not isinstance(num_levels, int) or num_levels < 1:
            raise ValueError(f"ResidualQuantizer: num_levels is {num_levels!r}, expected an integer >= 1")
        if not 0.0 <= quantizer_dropout <= 1.0:
            raise ValueError(
                f"ResidualQuantizer: quantizer_dropout is {quantizer_dropout}, expected a probability in [0, 1]"
            )
        if dropout_per not in ("element", "batch"):
            raise ValueError(
                f"ResidualQuantizer: dropout_per is {dropout_per!r}; choose 'element' (a number of levels per "
                f"batch element) or 'batch' (one for the whole batch)"
            )
        self.dim = dim
        self.num_levels = num_levels
        self.num_codebooks = num_levels
        self.kind = kind
        self.quantizer_dropout = quantizer_dropout
        self.dropout_per = dropout_per
        self.inner_kwargs = dict(inner_kwargs)

        if kind == "vq":
            if codebook_size is None or levels is not None:
                raise ValueError(
                    f"ResidualQuantizer: kind='vq' needs codebook_size (got {codebook_size}) and no levels "
                    f"(got {levels}); e.g. ResidualQuantizer({dim}, {num_levels}, codebook_size=1024)"
                )
            self.layers = nn.ModuleList(
                VectorQuantizer(dim, codebook_size, **inner_kwargs) for _ in range(num_levels)
            )
            self.codebook_size = codebook_size
            self.project_in: nn.Module | None = None
            self.project_out: nn.Module | None = None
        elif kind == "fsq":
            if levels is not None and codebook_size is not None:
                raise ValueError(
                    f"ResidualQuantizer: pass levels ({list(levels)}) or codebook_size ({codebook_size}) for "
                    f"kind='fsq', not both"
                )
            if levels is None:
                if codebook_size is None:
                    raise ValueError(
                        "ResidualQuantizer: kind='fsq' needs levels (e.g. levels=[8, 5, 5, 5]) or a "
                        "codebook_size with a recommended level set (2**8, 2**10, ..., 2**16)"
                    )
                levels = FSQ.recommended_levels(codebook_size)
            fsq_kwargs = {"symmetric": True, "bound": "clamp", **inner_kwargs}
            self.layers = nn.ModuleList(FSQ(levels, **fsq_kwargs) for _ in range(num_levels))
            self.codebook_size = self.layers[0].codebook_size
            width = len(levels)
            self.project_in = nn.Linear(dim, width) if width != dim else None
            self.project_out = nn.Linear(width, dim) if width != dim else None
            step = 1.0 / (torch.tensor(list(levels), dtype=torch.float32) - 1)  # max residual per level
            self.register_buffer("scales", step ** torch.arange(num_levels).unsqueeze(1), persistent=False)
        else:
            raise ValueError(f"ResidualQuantizer: kind is {kind!r}, expected 'vq' or 'fsq'")

    @classmethod
    def debug(cls) -> ResidualQuantizer:
        """A tiny quantizer for tests and smoke runs: 3 VQ levels of 16 codes on 8 channels."""
        return cls(8, 3, codebook_size=16, kind="vq")

    def config(self) -> dict[str, object]:
        config: dict[str, object] = {
            "dim": self.dim,
            "num_levels": self.num_levels,
            "codebook_size": self.codebook_size,
            "kind": self.kind,
            "quantizer_dropout": self.quantizer_dropout,
            "dropout_per": self.dropout_per,
            **self.inner_kwargs,
        }
        if self.kind == "fsq":
            config["levels"] = list(self.layers[0].levels)
        return config

    # -- level input/output space --------------------------------------------------------

    def _to_levels(self, x: Tensor) -> Tensor:
        z = x.float()
        if self.kind == "fsq":
            z = torch.tanh(self.project_in(z) if self.project_in is not None else z)
        return z

    def _from_levels(self, z: Tensor) -> Tensor:
        return self.project_out(z) if self.project_out is not None else z

    def _scale(self, level: int) -> Tensor | float:
        return self.scales[level] if self.kind == "fsq" else 1.0

    def _check_levels(self, n_levels: int | None) -> int:
        if n_levels is None:
            return self.num_levels
        if not isinstance(n_levels, int) or not 1 <= n_levels <= self.num_levels:
            raise ValueError(
                f"ResidualQuantizer: n_levels is {n_levels!r}, expected 1..{self.num_levels} (the levels it was built with)"
            )
        return n_levels

    # -- the interface -------------------------------------------------------------------

    @fp32_math
    def forward(self, x: Tensor, mask: Tensor | None = None, n_levels: int | None = None) -> QuantizerOutput:
        check_input(x, self.dim, mask, "ResidualQuantizer")
        n = self._check_levels(n_levels)
        z = self._to_levels(x)
        kept_levels = None
        if self.training and self.quantizer_dropout > 0:
            # Per batch element (or batch): with probability p, keep only the first k ~ U{1..n} levels.
            batch = x.shape[0] if self.dropout_per == "element" else 1
            k = torch.randint(1, n + 1, (batch,), device=x.device)
            drop = torch.rand(batch, device=x.device) < self.quantizer_dropout
            kept_levels = torch.where(drop, k, n).view(batch, *([1] * (x.ndim - 2)))

        residual = z
        total = torch.zeros_like(z)
        indices, losses = [], {}
        loss = z.new_zeros(())
        for level in range(n):
            level_mask = mask
            if kept_levels is not None:
                level_mask = (level < kept_levels).expand(x.shape[:-1])
                level_mask = level_mask if mask is None else level_mask & mask
            scale = self._scale(level)
            out = self.layers[level](residual / scale, mask=level_mask)
            q = out.quantized.float() * scale
            residual = residual - q.detach()
            total = total + q
            indices.append(out.indices)
            loss = loss + out.loss
            for name, value in out.losses.items():
                losses[name] = losses.get(name, 0.0) + value
        quantized = self._from_levels(total)
        if mask is not None:
            quantized = quantized * mask.unsqueeze(-1)
        indices_t = torch.stack(indices, dim=-1)
        sq_error = (residual.detach() ** 2).mean(-1)
        error = sq_error.mean() if mask is None else sq_error[mask].sum() / mask.sum().clamp_min(1)
        return QuantizerOutput(
            quantized=quantized.to(x.dtype),
            indices=indices_t,
            loss=loss,
            losses=losses,
            stats=multi_code_stats(indices_t, self.codebook_size, mask=mask, error=error),
        )

    @torch.no_grad()
    @fp32_math
    def encode(self, x: Tensor, mask: Tensor | None = None, n_levels: int | None = None) -> Tensor:
        """Indices ``(..., n_levels)`` (all levels by default); never updates a codebook."""
        check_input(x, self.dim, mask, "ResidualQuantizer")
        n = self._check_levels(n_levels)
        residual = self._to_levels(x)
        indices = []
        for level in range(n):
            scale = self._scale(level)
            idx = self.layers[level].encode(residual / scale, mask=mask)
            residual = residual - self.layers[level].decode(idx).float() * scale
            indices.append(idx)
        return torch.stack(indices, dim=-1)

    @torch.no_grad()
    @fp32_math
    def decode(self, indices: Tensor) -> Tensor:
        """``(..., k)`` indices of the first ``k <= num_levels`` levels -> ``(..., dim)`` fp32.

        ``-1`` (masked or dropped) contributes zero; a fully masked token decodes to zeros.
        """
        if not torch.is_tensor(indices) or indices.ndim < 1 or not 1 <= indices.shape[-1] <= self.num_levels:
            got = tuple(indices.shape) if torch.is_tensor(indices) else type(indices).__name__
            raise ValueError(
                f"ResidualQuantizer.decode: indices have shape {got}, expected (..., k) with 1 <= k <= "
                f"{self.num_levels} levels (coarsest first)"
            )
        total = None
        for level in range(indices.shape[-1]):
            part = self.layers[level].decode(indices[..., level]).float() * self._scale(level)
            total = part if total is None else total + part
        out = self._from_levels(total)
        return out * (indices >= 0).any(-1, keepdim=True)
