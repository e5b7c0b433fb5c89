"""Lookup-Free Quantization (Yu et al., "Language Model Beats Diffusion -- Tokenizer is Key
to Visual Generation", MAGVIT-v2, 2023), plus the bit machinery BSQ shares.

Each of ``bits`` channels is quantized to its sign, ``{-s, +s}``; the implicit codebook is
``{-s, s}^bits`` (``2**bits`` codes), never materialised. Bit ``i`` is 1 for a positive
channel and carries weight ``2**i`` in the index (little-endian).

The entropy loss (MAGVIT-v2, eq. 5) is ``E[H(q(c|x))] - gamma * H(E[q(c|x)])`` with the
soft assignment ``q(c|x) ∝ exp(-tau * ||x - c||^2)``. Because every code is a sign
pattern, ``q`` factorises over bits: bit ``i`` is positive with probability
``sigmoid(4 * tau * s * x_i)``. The per-sample entropy is therefore the exact sum of bit
entropies. The codebook entropy ``H(E[q])`` does not factorise; with
``entropy_group_size=g`` it is approximated by summing the entropies of groups of ``g``
bits (BSQ's factorised approximation, an upper bound by subadditivity, memory
``N * (bits / g) * 2**g``); ``g = bits`` (the default for LFQ) is exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Quantizer, QuantizerOutput, check_input, code_stats, fp32_math

__all__ = ["LFQ", "bit_entropies", "bits_to_indices", "check_indices", "indices_to_bits"]

_MAX_EXACT_GROUP = 16  # 2**16 probabilities per token is the most an exact group may hold


class _SignSTE(torch.autograd.Function):
    """``scale * sign(z)`` (zero counts as positive) with an identity (straight-through) gradient.

    Returning the exact code values (rather than ``z + (q - z).detach()``, which can be
    off by one ulp) keeps ``decode(encode(x)) == forward(x)`` bit for bit.
    """

    @staticmethod
    def forward(ctx, z: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        return torch.where(z >= 0, scale, -scale).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def sign_ste(z: Tensor, scale: float) -> Tensor:
    return _SignSTE.apply(z, scale)


def bits_to_indices(positive: Tensor) -> Tensor:
    """``(..., bits)`` bool -> ``(...)`` int64 indices, bit ``i`` weighing ``2**i``."""
    bits = positive.shape[-1]
    if bits <= 24:  # exact in fp32: one small matmul
        weights = torch.pow(2.0, torch.arange(bits, device=positive.device, dtype=torch.float32))
        return (positive.float() @ weights).long()
    weights = torch.pow(2, torch.arange(bits, device=positive.device, dtype=torch.int64))
    return (positive.long() * weights).sum(-1)


def indices_to_bits(indices: Tensor, bits: int) -> Tensor:
    """``(...)`` int64 indices -> ``(..., bits)`` bool, the inverse of :func:`bits_to_indices`."""
    shifts = torch.arange(bits, device=indices.device, dtype=torch.int64)
    return (indices.unsqueeze(-1) >> shifts) & 1 == 1


def check_indices(indices: Tensor, codebook_size: int, who: str) -> None:
    """Raise ``ValueError`` unless ``indices`` is an integer tensor in ``-1 .. codebook_size - 1``."""
    if not torch.is_tensor(indices) or indices.is_floating_point() or indices.dtype == torch.bool:
        got = indices.dtype if torch.is_tensor(indices) else type(indices).__name__
        raise ValueError(f"{who}.decode: expected an integer tensor of indices, got {got}")
    if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= codebook_size):
        raise ValueError(
            f"{who}.decode: indices span [{int(indices.min())}, {int(indices.max())}], but this quantizer has "
            f"codes 0..{codebook_size - 1} (and -1 for padding); check which tokenizer produced them"
        )


def _entropy(p: Tensor, dim: int = -1) -> Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(dim)


def bit_entropies(logits: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Entropy terms of the factorised soft assignment given per-bit logits.

    Args:
        logits: ``(N, bits)`` fp32; bit ``i`` of token ``n`` is 1 with probability
            ``sigmoid(logits[n, i])``.
        group_size: bits per group for the codebook entropy (``bits`` for the exact value).

    Returns:
        ``(per_sample, codebook)``: the mean over tokens of ``H(q(c|x_n))`` (exact), and the
        sum over bit groups of ``H(mean_n q(c_group|x_n))`` (nats). The second equals
        ``H(mean_n q(c|x_n))`` when ``group_size >= bits`` and upper-bounds it otherwise.
    """
    n, bits = logits.shape
    log_pos = F.logsigmoid(logits)
    log_neg = F.logsigmoid(-logits)
    per_sample = -(log_pos.exp() * log_pos + log_neg.exp() * log_neg).sum(-1).mean()
    codebook = logits.new_zeros(())
    for start in range(0, bits, group_size):
        stop = min(start + group_size, bits)
        g = stop - start
        # (2**g, g) table of every bit pattern in the group, little-endian.
        table = indices_to_bits(torch.arange(2**g, device=logits.device), g).float()
        # log q(c_group | x_n) = sum_i [bit_i ? log_pos_i : log_neg_i]     (N, 2**g)
        log_q = log_neg[:, start:stop].sum(-1, keepdim=True) + (log_pos - log_neg)[:, start:stop] @ table.t()
        codebook = codebook + _entropy(log_q.exp().mean(0))
    return per_sample, codebook


class LFQ(Quantizer):
    """Lookup-free (sign) quantizer with MAGVIT-v2's entropy loss.

    Args:
        dim: input channels (default: ``bits``); projections in/out when ``dim != bits``.
        bits: code channels; ``codebook_size = 2**bits`` (default: ``dim``).
        codebook_scale: the code value ``s`` (codes are ``±s``).
        entropy_weight: weight of ``per_sample_entropy - diversity_gamma * codebook_entropy``.
        diversity_gamma: weight of the codebook entropy inside the entropy loss.
        commitment_weight: weight of ``mse(z, sg[q])``.
        inv_temperature: ``tau`` of the soft assignment (see the module doc).
        entropy_group_size: bits per group for the codebook entropy; ``None`` = all bits
            (exact, at most 16 bits).
    """

    def __init__(
        self,
        dim: int | None = None,
        *,
        bits: int | None = None,
        codebook_scale: float = 1.0,
        entropy_weight: float = 0.1,
        diversity_gamma: float = 1.0,
        commitment_weight: float = 0.25,
        inv_temperature: float = 100.0,
        entropy_group_size: int | None = None,
    ) -> None:
        super().__init__()
        self.bits, self.dim = _resolve_bits(type(self).__name__, dim, bits)
        if entropy_group_size is None and self.bits > _MAX_EXACT_GROUP:
            raise ValueError(
                f"LFQ: bits={self.bits} with entropy_group_size=None would hold 2**{self.bits} probabilities "
                f"per token for the exact codebook entropy; pass entropy_group_size <= {_MAX_EXACT_GROUP} "
                f"(e.g. 8) for the factorised approximation, or use BSQ"
            )
        group = self.bits if entropy_group_size is None else entropy_group_size
        if not 1 <= group <= _MAX_EXACT_GROUP:
            raise ValueError(
                f"LFQ: entropy_group_size is {entropy_group_size}, expected 1..{_MAX_EXACT_GROUP} "
                f"(2**group probabilities per token); 8 is a good default"
            )
        _check_nonnegative(
            "LFQ",
            entropy_weight=entropy_weight,
            diversity_gamma=diversity_gamma,
            commitment_weight=commitment_weight,
        )
        _check_positive("LFQ", codebook_scale=codebook_scale, inv_temperature=inv_temperature)
        self.codebook_size = 2**self.bits
        self.codebook_scale = codebook_scale
        self.entropy_weight = entropy_weight
        self.diversity_gamma = diversity_gamma
        self.commitment_weight = commitment_weight
        self.inv_temperature = inv_temperature
        self.entropy_group_size = group
        self.project_in: nn.Module = (
            nn.Linear(self.dim, self.bits) if self.dim != self.bits else nn.Identity()
        )
        self.project_out: nn.Module = (
            nn.Linear(self.bits, self.dim) if self.dim != self.bits else nn.Identity()
        )

    @classmethod
    def debug(cls) -> LFQ:
        """A tiny quantizer for tests and smoke runs: 6 bits (64 codes), 8-dim input."""
        return cls(8, bits=6)

    def config(self) -> dict[str, object]:
        return {
            "dim": self.dim,
            "bits": self.bits,
            "codebook_scale": self.codebook_scale,
            "entropy_weight": self.entropy_weight,
            "diversity_gamma": self.diversity_gamma,
            "commitment_weight": self.commitment_weight,
            "inv_temperature": self.inv_temperature,
            "entropy_group_size": self.entropy_group_size,
        }

    # -- the two hooks BSQ overrides -----------------------------------------------------

    def _latent(self, x: Tensor) -> Tensor:
        """The fp32 vector that is quantized, ``(..., bits)``."""
        return _linear_fp32(self.project_in, x)

    @property
    def code_value(self) -> float:
        """The magnitude of every code channel."""
        return self.codebook_scale

    # -- the interface -------------------------------------------------------------------

    @fp32_math
    def forward(self, x: Tensor, mask: Tensor | None = None) -> QuantizerOutput:
        who = type(self).__name__
        check_input(x, self.dim, mask, who)
        z = self._latent(x)  # (..., bits) fp32
        positive = z >= 0
        indices = bits_to_indices(positive)
        q = sign_ste(z, self.code_value)
        quantized = _linear_fp32(self.project_out, q)
        if mask is not None:
            quantized = quantized * mask.unsqueeze(-1)
            indices = indices.masked_fill(~mask, -1)

        z_real = z.reshape(-1, self.bits) if mask is None else z[mask]
        sq_err = (z_real - torch.where(z_real >= 0, self.code_value, -self.code_value)) ** 2
        # A fully padded batch has no loss (rather than the NaN mean of nothing).
        commitment = sq_err.mean() if z_real.shape[0] > 0 else z.sum() * 0
        losses = {"commitment": commitment}
        loss = self.commitment_weight * commitment
        if self.training and self.entropy_weight > 0 and z_real.shape[0] > 0:
            logits = (4 * self.inv_temperature * self.code_value) * z_real
            per_sample, codebook = bit_entropies(logits, self.entropy_group_size)
            losses["per_sample_entropy"] = per_sample
            losses["codebook_entropy"] = codebook
            loss = loss + self.entropy_weight * (per_sample - self.diversity_gamma * codebook)
        return QuantizerOutput(
            quantized=quantized.to(x.dtype),
            indices=indices,
            loss=loss,
            losses=losses,
            stats=code_stats(indices, self.codebook_size, mask=mask, error=commitment),
        )

    @torch.no_grad()
    @fp32_math
    def encode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        check_input(x, self.dim, mask, type(self).__name__)
        indices = bits_to_indices(self._latent(x) >= 0)
        return indices if mask is None else indices.masked_fill(~mask, -1)

    @torch.no_grad()
    @fp32_math
    def decode(self, indices: Tensor) -> Tensor:
        """Indices ``(...)`` -> quantized vectors ``(..., dim)`` in fp32; ``-1`` decodes to zeros."""
        check_indices(indices, self.codebook_size, type(self).__name__)
        valid = indices >= 0
        positive = indices_to_bits(indices.clamp_min(0), self.bits)
        q = torch.where(positive, self.code_value, -self.code_value).float()
        return _linear_fp32(self.project_out, q) * valid.unsqueeze(-1)


def _linear_fp32(layer: nn.Module, x: Tensor) -> Tensor:
    """Apply an optional projection in fp32 (identity layers pass ``x`` through as fp32)."""
    if isinstance(layer, nn.Identity):
        return x.float()
    return F.linear(x.float(), layer.weight.float(), layer.bias.float())  # type: ignore[union-attr]


def _resolve_bits(who: str, dim: int | None, bits: int | None) -> tuple[int, int]:
    if dim is None and bits is None:
        raise ValueError(
            f"{who}: pass dim (input channels) or bits (code channels), or both, e.g. {who}(64, bits=12)"
        )
    for name, value in (("dim", dim), ("bits", bits)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{who}: {name} is {value!r}, expected a positive integer")
    bits = bits if bits is not None else dim
    if bits > 62:  # type: ignore[operator]
        raise ValueError(
            f"{who}: bits={bits} does not fit an int64 index; use at most 62 bits (or group channels)"
        )
    return bits, (dim if dim is not None else bits)  # type: ignore[return-value]


def _check_nonnegative(who: str, **values: float) -> None:
    for name, value in values.items():
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{who}: {name} is {value}, expected a finite value >= 0")


def _check_positive(who: str, **values: float) -> None:
    for name, value in values.items():
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{who}: {name} is {value}, expected a finite value > 0")
