"""Grouped (multi-codebook) quantization: the channels are split into ``groups`` equal
slices and each slice is quantized by its own quantizer (UniTok, "A Unified Tokenizer for
Visual Generation and Understanding", 2025; channel-split quantization as in MambaVideo).

``G`` codebooks of ``K`` codes address ``K**G`` combinations while each codebook stays
small enough to be used fully. Indices are ``(..., groups)`` in channel order: group ``g``
holds channels ``g * dim/groups`` to ``(g + 1) * dim/groups - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .base import Quantizer, QuantizerOutput, check_input, fp32_math, multi_code_stats
from .bsq import BSQ
from .fsq import FSQ
from .lfq import LFQ
from .vq import VectorQuantizer

__all__ = ["GroupedQuantizer"]


class GroupedQuantizer(Quantizer):
    """One quantizer per channel group.

    Args:
        dim: input channels, divisible by ``groups``.
        groups: number of channel groups (``num_codebooks``).
        codebook_size: codes per group (``kind="vq"``); for ``"fsq"`` it picks the
            recommended levels when ``levels`` is not given.
        kind: ``"vq"``, ``"fsq"``, ``"lfq"`` or ``"bsq"``.
        levels: FSQ levels (``kind="fsq"``).
        bits: code bits per group (``kind="lfq"`` / ``"bsq"``; default ``dim // groups``).
        **inner_kwargs: passed to every group's constructor.
    """

    def __init__(
        self,
        dim: int,
        groups: int,
        *,
        codebook_size: int | None = None,
        kind: Literal["vq", "fsq", "lfq", "bsq"] = "vq",
        levels: Sequence[int] | None = None,
        bits: int | None = None,
        **inner_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"GroupedQuantizer: groups is {groups!r}, expected an integer >= 1")
        if not isinstance(dim, int) or dim < 1 or dim % groups:
            raise ValueError(
                f"GroupedQuantizer: dim={dim!r} must be a positive multiple of groups={groups}; "
                f"pick groups that divide dim (e.g. {[g for g in range(1, 9) if isinstance(dim, int) and dim > 0 and dim % g == 0]})"
            )
        self.dim = dim
        self.groups = groups
        self.num_codebooks = groups
        self.kind = kind
        self.inner_kwargs = dict(inner_kwargs)
        width = dim // groups
        self.group_dim = width
        if kind == "vq":
            if codebook_size is None:
                raise ValueError("GroupedQuantizer: kind='vq' needs codebook_size, e.g. codebook_size=256")
            make = lambda: VectorQuantizer(width, codebook_size, **inner_kwargs)  # noqa: E731
        elif kind == "fsq":
            group_levels = list(levels) if levels is not None else None
            if group_levels is not None and codebook_size is not None:
                raise ValueError(
                    f"GroupedQuantizer: pass levels ({group_levels}) or codebook_size ({codebook_size}) "
                    f"for kind='fsq', not both"
                )
            if group_levels is None:
                if codebook_size is None:
                    raise ValueError(
                        "GroupedQuantizer: kind='fsq' needs levels or a codebook_size such as 2**10"
                    )
                group_levels = FSQ.recommended_levels(codebook_size)
            make = lambda: FSQ(group_levels, dim=width, **inner_kwargs)  # noqa: E731
        elif kind in ("lfq", "bsq"):
            if codebook_size is not None:
                raise ValueError(
                    f"GroupedQuantizer: kind={kind!r} takes bits (codebook 2**bits), not codebook_size={codebook_size}"
                )
            cls = LFQ if kind == "lfq" else BSQ
            make = lambda: cls(width, bits=bits, **inner_kwargs)  # noqa: E731
        else:
            raise ValueError(f"GroupedQuantizer: kind is {kind!r}, expected 'vq', 'fsq', 'lfq' or 'bsq'")
        self.quantizers = nn.ModuleList(make() for _ in range(groups))
        self.codebook_size = self.quantizers[0].codebook_size

    @classmethod
    def debug(cls) -> GroupedQuantizer:
        """A tiny quantizer for tests and smoke runs: 2 VQ groups of 16 codes on 8 channels."""
        return cls(8, 2, codebook_size=16, kind="vq")

    def config(self) -> dict[str, object]:
        return {
            "dim": self.dim,
            "groups": self.groups,
            "codebook_size": self.codebook_size,
            "kind": self.kind,
            **self.inner_kwargs,
        }

    @fp32_math
    def forward(self, x: Tensor, mask: Tensor | None = None) -> QuantizerOutput:
        check_input(x, self.dim, mask, "GroupedQuantizer")
        outs = [
            q(chunk, mask=mask)
            for q, chunk in zip(self.quantizers, x.split(self.group_dim, dim=-1), strict=True)
        ]
        losses: dict[str, Tensor] = {}
        for out in outs:
            for name, value in out.losses.items():
                losses[name] = losses.get(name, 0.0) + value
        indices = torch.stack([o.indices for o in outs], dim=-1)
        error = torch.stack([o.stats.quantization_error for o in outs]).mean()  # type: ignore[union-attr]
        return QuantizerOutput(
            quantized=torch.cat([o.quantized for o in outs], dim=-1),
            indices=indices,
            loss=sum((o.loss for o in outs), start=x.new_zeros((), dtype=torch.float32)),
            losses=losses,
            stats=multi_code_stats(indices, self.codebook_size, mask=mask, error=error),
        )

    @torch.no_grad()
    @fp32_math
    def encode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        check_input(x, self.dim, mask, "GroupedQuantizer")
        chunks = x.split(self.group_dim, dim=-1)
        return torch.stack(
            [q.encode(c, mask=mask) for q, c in zip(self.quantizers, chunks, strict=True)], dim=-1
        )

    @torch.no_grad()
    @fp32_math
    def decode(self, indices: Tensor) -> Tensor:
        """``(..., groups)`` indices -> ``(..., dim)`` fp32; ``-1`` decodes to zeros."""
        if not torch.is_tensor(indices) or indices.ndim < 1 or indices.shape[-1] != self.groups:
            got = tuple(indices.shape) if torch.is_tensor(indices) else type(indices).__name__
            raise ValueError(
                f"GroupedQuantizer.decode: indices have shape {got}, expected (..., {self.groups}), one index per group"
            )
        return torch.cat([q.decode(indices[..., g]).float() for g, q in enumerate(self.quantizers)], dim=-1)
