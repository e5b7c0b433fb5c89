"""The one result type and the one interface every Tessera quantizer shares.

Conventions (documented once, used everywhere):

* **Channel-last.** A quantizer takes ``x`` of shape ``(..., dim)`` and returns
  ``quantized`` of the same shape and dtype.
* **Indices.** A single-codebook quantizer returns indices of shape ``x.shape[:-1]``;
  a multi-codebook one (residual levels, groups) returns ``x.shape[:-1] + (num_codebooks,)``
  with codebook ``q`` in position ``q`` (residual: coarsest level first; grouped: channel
  group order). Masked positions hold ``-1``.
* **Mask.** ``mask`` has shape ``x.shape[:-1]``, ``True`` for real tokens. Masked tokens
  take no part in codebook updates, losses or statistics, and come back as zeros.
* **Radix / bit order: little-endian.** For implicit codebooks (FSQ, LFQ, BSQ) the
  index is ``sum_i digit_i * prod(levels[:i])``: dimension 0 is the least significant
  digit (bit 0 for LFQ/BSQ has weight ``2**0``).
* **fp32 math.** Distances, rounding, EMA updates and entropies are computed in fp32
  whatever the input dtype; only ``quantized`` is cast back.
* ``decode(encode(x)) == forward(x).quantized`` in eval mode.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "fp32_math",
    "QuantizerOutput",
    "QuantizerStats",
    "Quantizer",
    "code_stats",
    "check_input",
]


F = TypeVar("F", bound=Callable[..., Any])


def fp32_math(fn: F) -> F:
    """Run a quantizer method with autocast switched off, so that projections,
    rounding and index arithmetic stay in fp32 under ``torch.autocast`` (bf16 matmuls
    would otherwise produce wrong, even out-of-range, indices)."""

    @functools.wraps(fn)
    def wrapper(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        device_type = x.device.type if torch.is_tensor(x) else "cpu"
        with torch.autocast(device_type, enabled=False):
            return fn(self, x, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass
class QuantizerStats:
    """Detached statistics of one forward pass (over unmasked tokens only).

    ``counts`` has shape ``(num_codebooks, codebook_size)`` for multi-codebook
    quantizers and ``(codebook_size,)`` otherwise. Huge implicit codebooks (more than
    ``2**20`` codes) report ``counts=None`` and compute utilization/perplexity from the
    unique indices instead.
    """

    counts: Tensor | None
    perplexity: Tensor
    utilization: Tensor
    quantization_error: Tensor

    def as_dict(self) -> dict[str, float]:
        return {
            "perplexity": float(self.perplexity),
            "utilization": float(self.utilization),
            "quantization_error": float(self.quantization_error),
        }


@dataclass
class QuantizerOutput:
    """What every quantizer's ``forward`` returns."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: QuantizerStats | None = None


class Quantizer(nn.Module):
    """Base class: the interface and shared input checks. Subclasses implement
    ``forward``, ``encode`` and ``decode``."""

    dim: int
    codebook_size: int
    num_codebooks: int = 1

    def forward(self, x: Tensor, mask: Tensor | None = None) -> QuantizerOutput:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError


def check_input(x: Tensor, dim: int, mask: Tensor | None, who: str) -> None:
    """Raise ``ValueError`` naming the value, the rule and the fix."""
    if not torch.is_tensor(x):
        raise ValueError(f"{who}: expected a tensor of shape (..., {dim}), got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(
            f"{who}: input has shape {tuple(x.shape)}, expected (..., {dim}) with at least one "
            f"batch dimension; add one with x.unsqueeze(0)"
        )
    if x.shape[-1] != dim:
        raise ValueError(
            f"{who}: input's last dimension is {x.shape[-1]}, but the quantizer was built with "
            f"dim={dim}; quantizers are channel-last, so move channels last (e.g. x.movedim(1, -1)) "
            f"or build the quantizer with dim={x.shape[-1]}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{who}: input dtype is {x.dtype}, expected a floating-point tensor")
    # A NaN/inf anywhere makes the sum non-finite: one cheap reduction instead of an
    # elementwise pass; the full count runs only then (or on an overflowing sum).
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{who}: input has {bad} NaN/inf values; quantizing them would corrupt the codebook. "
            f"Check the encoder output (learning rate, loss scale) before the quantizer"
        )
    if mask is not None:
        if mask.shape != x.shape[:-1]:
            raise ValueError(
                f"{who}: mask has shape {tuple(mask.shape)}, expected x.shape[:-1] = {tuple(x.shape[:-1])}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"{who}: mask dtype is {mask.dtype}, expected torch.bool (True = real token)")


def code_stats(
    indices: Tensor,
    codebook_size: int,
    *,
    mask: Tensor | None = None,
    error: Tensor | None = None,
) -> QuantizerStats:
    """Per-code counts, perplexity and utilization of ``indices`` (one codebook, or a
    trailing codebook dimension for several), ignoring ``-1`` and masked positions.

    ``indices`` of shape ``(..., Q)`` with ``Q > 1`` codebooks is passed with
    ``multi=True`` semantics by calling this once per codebook; use
    :func:`multi_code_stats` for that.
    """
    with torch.no_grad():
        flat = indices.reshape(-1)
        if mask is not None:
            flat = flat[mask.reshape(-1)]
        if flat.numel() > 0 and int(flat.min()) < 0:
            flat = flat[flat >= 0]
        err = error.detach().float() if error is not None else torch.zeros((), device=indices.device)
        if flat.numel() == 0:
            zero = torch.zeros((), device=indices.device)
            counts = None if codebook_size > 2**20 else torch.zeros(codebook_size, device=indices.device)
            return QuantizerStats(counts=counts, perplexity=zero, utilization=zero, quantization_error=err)
        if codebook_size > 2**20:
            uniq, c = torch.unique(flat, return_counts=True)
            p = c.float() / c.sum()
            counts = None
            used = torch.tensor(float(uniq.numel()), device=indices.device)
        else:
            counts = torch.bincount(flat, minlength=codebook_size).float()
            p = counts / counts.sum()
            used = (counts > 0).sum().float()
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
        return QuantizerStats(
            counts=counts,
            perplexity=entropy.exp(),
            utilization=used / codebook_size,
            quantization_error=err,
        )


def multi_code_stats(
    indices: Tensor,
    codebook_size: int,
    *,
    mask: Tensor | None = None,
    error: Tensor | None = None,
) -> QuantizerStats:
    """Stats for ``indices`` of shape ``(..., Q)``: counts ``(Q, K)``, and perplexity /
    utilization averaged over the ``Q`` codebooks."""
    per = [code_stats(indices[..., q], codebook_size, mask=mask) for q in range(indices.shape[-1])]
    counts = None if per[0].counts is None else torch.stack([s.counts for s in per])
    err = error.detach().float() if error is not None else torch.zeros((), device=indices.device)
    return QuantizerStats(
        counts=counts,
        perplexity=torch.stack([s.perplexity for s in per]).mean(),
        utilization=torch.stack([s.utilization for s in per]).mean(),
        quantization_error=err,
    )


def entropy_from_logits(logits: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` along ``dim``, in fp32."""
    logp = torch.log_softmax(logits.float(), dim=dim)
    return -(logp.exp() * logp).sum(dim)


LOG2 = math.log(2.0)
