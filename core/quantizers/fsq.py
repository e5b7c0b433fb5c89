"""Finite Scalar Quantization (Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made
Simple", 2023), with the symmetric variant and noise substitution of Parker et al.
("Scaling Transformers for Low-Bitrate High-Quality Speech Coding", 2024).

Each of the ``len(levels)`` channels is bounded, then rounded to one of ``levels[i]``
values; the codebook is the implicit product of those sets and is never materialised.
A channel's digit ``d_i`` (``0 <= d_i < levels[i]``) makes the index
``sum_i d_i * prod(levels[:i])`` (little-endian: channel 0 is the least significant digit).

Code values per channel with ``L`` levels and ``h = L // 2``:

* default (the paper's): ``(d - h) / h``, so odd ``L`` is symmetric around 0 and even ``L``
  has one more negative value than positive (``L = 8``: -1, -0.75, ..., 0.75);
* ``symmetric=True``: ``2 d / (L - 1) - 1``, ``L`` evenly spaced values on ``[-1, 1]``.

Bounding is ``tanh`` (the paper) or a hard ``clamp`` (used inside residual FSQ, whose
residuals are already small). Rounding uses straight-through gradients. The whole map
(projections included) runs in fp32 as one autograd function with a hand-written
backward, so a forward pass is a handful of kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .base import Quantizer, QuantizerOutput, check_input, code_stats, fp32_math
from .lfq import check_indices

__all__ = ["FSQ", "RECOMMENDED_LEVELS"]

# Table 1 of the FSQ paper: levels for a target codebook size.
RECOMMENDED_LEVELS: dict[int, tuple[int, ...]] = {
    2**8: (8, 6, 5),
    2**10: (8, 5, 5, 5),
    2**12: (7, 5, 5, 5, 5),
    2**14: (8, 8, 8, 6, 5),
    2**16: (8, 8, 8, 5, 5, 5),
}

_BOUND_EPS = 1e-3  # keeps tanh's range a hair wider than the outer bins (paper, appendix A.1)


def _project_out(codes_t: Tensor, w_out: Tensor | None, b_out: Tensor | None) -> Tensor:
    """Channel-first codes ``(c, N)`` -> ``(N, dim)`` (the same kernel in forward and decode)."""
    return codes_t.t() if w_out is None else torch.addmm(b_out, codes_t.t(), w_out.t())


class _FSQFunction(torch.autograd.Function):
    """The whole quantizer as one autograd node (fp32), with a hand-written backward.

    ``z = x W_in^T + b_in`` (optional), ``t = bound(z + shift) * a + b``, digits ``round(t)``,
    codes ``(digits * code_mult - center) / denom``, ``out = codes W_out^T + b_out`` (optional).
    Rounding is straight-through. With ``noise_p > 0`` each digit is replaced, with that
    probability, by ``t + U(-1/2, 1/2)`` (one bin of uniform noise).

    The few code channels are kept channel-first, ``(c, N)``: a matrix product with a
    long, thin ``(N, c)`` output is several times slower on CPU than its transpose, and
    one node instead of a dozen saves the graph bookkeeping. Buffers are ``(c, 1)``
    columns. Returns ``(out (N, dim), digits (c, N), t (c, N))``; digits and ``t`` carry
    no gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        w_in: Tensor | None,
        b_in: Tensor | None,
        w_out: Tensor | None,
        b_out: Tensor | None,
        buffers: tuple[Tensor, ...],
        use_tanh: bool,
        noise_p: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        shift, a, b, code_mult, code_center, code_denom = buffers
        z_t = x.t() if w_in is None else torch.addmm(b_in.unsqueeze(1), w_in, x.t())  # (c, N)
        u = z_t + shift
        bounded = torch.tanh(u) if use_tanh else u.clamp(-1.0, 1.0)
        t = torch.addcmul(b, bounded, a)
        digits = torch.round(t)
        used = digits
        if noise_p > 0:
            noisy = torch.rand_like(t) < noise_p
            used = torch.where(noisy, t + torch.rand_like(t) - 0.5, digits)
        codes_t = torch.addcmul(code_center, used, code_mult).div_(code_denom)
        out = _project_out(codes_t, w_out, b_out)
        # d(codes)/dz per element: a * code_mult / code_denom * bound'(u).
        slope = (1.0 - bounded * bounded) if use_tanh else ((u >= -1.0) & (u <= 1.0)).float()
        ctx.save_for_backward(x, w_in, w_out, codes_t, slope.mul_(a * code_mult / code_denom))
        ctx.mark_non_differentiable(digits, t)
        return out, digits, t

    @staticmethod
    def backward(ctx, grad: Tensor, _g_digits: Tensor, _g_t: Tensor):  # type: ignore[override]
        x, w_in, w_out, codes_t, slope = ctx.saved_tensors
        g_w_out = g_b_out = g_w_in = g_b_in = g_x = None
        if w_out is None:
            g_codes_t = grad.t()
        else:
            g_codes_t = w_out.t() @ grad.t()  # (c, N)
            if ctx.needs_input_grad[3]:
                g_w_out = (codes_t @ grad).t()
            if ctx.needs_input_grad[4]:
                g_b_out = grad.sum(0)
        g_z_t = g_codes_t * slope
        if w_in is None:
            g_x = g_z_t.t()
        else:
            if ctx.needs_input_grad[1]:
                g_w_in = g_z_t @ x
            if ctx.needs_input_grad[2]:
                g_b_in = g_z_t.sum(1)
            if ctx.needs_input_grad[0]:
                g_x = g_z_t.t() @ w_in
        return g_x, g_w_in, g_b_in, g_w_out, g_b_out, None, None, None


class FSQ(Quantizer):
    """Finite scalar quantizer over ``len(levels)`` channels.

    Args:
        levels: values per channel, each ``>= 2``; ``codebook_size = prod(levels)``.
        dim: input channels; when it differs from ``len(levels)``, linear layers project
            in and out (default: ``len(levels)``).
        symmetric: evenly spaced codes on ``[-1, 1]`` for every ``L`` (see module doc).
        bound: ``"tanh"`` (the paper) or ``"clamp"`` (hard clamp to ``[-1, 1]``).
        noise_dropout: training only: the probability that a channel's rounding is
            replaced by uniform noise of one bin's width (indices are unaffected).
    """

    def __init__(
        self,
        levels: Sequence[int],
        *,
        dim: int | None = None,
        symmetric: bool = False,
        bound: Literal["tanh", "clamp"] = "tanh",
        noise_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        levels = list(levels)
        if len(levels) == 0:
            raise ValueError(
                "FSQ: levels is empty; pass one level count per channel, e.g. levels=[8, 5, 5, 5]"
            )
        for i, level in enumerate(levels):
            if not isinstance(level, int) or isinstance(level, bool) or level < 2:
                raise ValueError(
                    f"FSQ: levels[{i}] is {level!r}, but every channel needs an integer number of levels >= 2; "
                    f"use e.g. FSQ.recommended_levels(1024) = {list(RECOMMENDED_LEVELS[2**10])}"
                )
        if math.prod(levels) > 2**62:
            raise ValueError(
                f"FSQ: levels {levels} make {math.prod(levels)} codes, more than an int64 index holds (2**62); "
                f"use fewer channels or levels, or a GroupedQuantizer of several FSQs"
            )
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise ValueError(f"FSQ: dim is {dim!r}, expected a positive integer (or None for len(levels))")
        if bound not in ("tanh", "clamp"):
            raise ValueError(f"FSQ: bound is {bound!r}, expected 'tanh' or 'clamp'")
        if not 0.0 <= noise_dropout <= 1.0:
            raise ValueError(f"FSQ: noise_dropout is {noise_dropout}, expected a probability in [0, 1]")

        self.levels = tuple(levels)
        self.codebook_dim = len(levels)
        self.dim = dim if dim is not None else self.codebook_dim
        self.codebook_size = math.prod(levels)
        self.symmetric = symmetric
        self.bound = bound
        self.noise_dropout = noise_dropout

        if self.dim != self.codebook_dim:
            self.project_in: nn.Module = nn.Linear(self.dim, self.codebook_dim)
            self.project_out: nn.Module = nn.Linear(self.codebook_dim, self.dim)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self._has_projection = self.dim != self.codebook_dim

        L = torch.tensor(levels, dtype=torch.float64)
        h = torch.floor(L / 2)
        # Codes are (digit * mult - center) / denom: exact at the grid points (0 and ±1 included).
        if symmetric:
            a = (L - 1) / 2
            b = (L - 1) / 2
            shift = torch.zeros_like(L)
            mult, center, denom = 2 * torch.ones_like(L), L - 1, L - 1
        else:
            half = (L - 1) * (1 + _BOUND_EPS) / 2 if bound == "tanh" else (L - 1) / 2
            offset = torch.where(L % 2 == 0, 0.5, 0.0)
            a = half
            b = h - offset
            shift = torch.atanh(offset / half) if bound == "tanh" else offset / half
            mult, center, denom = torch.ones_like(L), h, h
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]], dtype=torch.int64), 0)
        for name, value in {
            "_shift": shift,
            "_a": a,
            "_b": b,
            "_code_mult": mult,
            "_neg_center": -center,
            "_code_denom": denom,
            "_levels": L,
        }.items():
            self.register_buffer(name, value.float(), persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("_basis_f", basis.float(), persistent=False)

    # -- presets -------------------------------------------------------------------------

    @staticmethod
    def recommended_levels(codebook_size: int) -> list[int]:
        """The FSQ paper's level set for ``codebook_size`` in {2^8, 2^10, 2^12, 2^14, 2^16}."""
        if codebook_size not in RECOMMENDED_LEVELS:
            sizes = ", ".join(f"2^{int(math.log2(k))}={k}" for k in RECOMMENDED_LEVELS)
            raise ValueError(
                f"FSQ.recommended_levels: no recommended level set for codebook_size={codebook_size}; "
                f"the FSQ paper lists {sizes}; pick one of those or pass levels explicitly"
            )
        return list(RECOMMENDED_LEVELS[codebook_size])

    @classmethod
    def debug(cls) -> FSQ:
        """A tiny quantizer for tests and smoke runs: 3 channels, 60 codes, 8-dim input."""
        return cls([5, 4, 3], dim=8)

    def config(self) -> dict[str, object]:
        return {
            "levels": list(self.levels),
            "dim": self.dim,
            "symmetric": self.symmetric,
            "bound": self.bound,
            "noise_dropout": self.noise_dropout,
        }

    # -- digit <-> code <-> index --------------------------------------------------------

    def _quantize(self, x: Tensor, noise_p: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """``x (..., dim)`` -> ``(quantized, digits, t)`` in fp32, through :class:`_FSQFunction`.

        ``digits`` and ``t`` are ``(..., len(levels))`` views of channel-first tensors."""
        flat = x.reshape(-1, self.dim).float()
        weights: list[Tensor | None] = [None, None, None, None]
        if self._has_projection:
            weights = [
                self.project_in.weight.float(),  # type: ignore[union-attr]
                self.project_in.bias.float(),  # type: ignore[union-attr]
                self.project_out.weight.float(),  # type: ignore[union-attr]
                self.project_out.bias.float(),  # type: ignore[union-attr]
            ]
        buffers = tuple(
            b.unsqueeze(1)
            for b in (self._shift, self._a, self._b, self._code_mult, self._neg_center, self._code_denom)
        )
        out, digits_t, t_t = _FSQFunction.apply(flat, *weights, buffers, self.bound == "tanh", noise_p)
        lead = x.shape[:-1]
        return out.reshape(*lead, self.dim), digits_t.t().reshape(*lead, -1), t_t.t().reshape(*lead, -1)

    def digits_to_indices(self, digits: Tensor) -> Tensor:
        """``(..., len(levels))`` integer-valued digits -> ``(...)`` int64 indices (little-endian)."""
        if digits.is_floating_point() and self.codebook_size <= 2**24:
            # One small matmul; exact in fp32 below 2**24.
            return (digits.float() @ self._basis_f).long()
        return (digits.to(torch.int64) * self._basis).sum(-1)

    def indices_to_digits(self, indices: Tensor) -> Tensor:
        """``(...)`` indices -> ``(..., len(levels))`` int64 digits."""
        return torch.div(indices.unsqueeze(-1), self._basis, rounding_mode="floor") % self._levels.long()

    def digits_to_codes(self, digits: Tensor) -> Tensor:
        """Digits -> code values in fp32 (before the output projection)."""
        return torch.addcmul(self._neg_center, digits.float(), self._code_mult).div_(self._code_denom)

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Code values (any float dtype, e.g. bf16) -> indices; the inverse of ``indices_to_codes``."""
        digits = torch.round((codes.float() * self._code_denom - self._neg_center) / self._code_mult)
        return self.digits_to_indices(digits)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices -> fp32 code values of shape ``indices.shape + (len(levels),)``; no projection."""
        return self.digits_to_codes(self.indices_to_digits(indices))

    # -- the interface -------------------------------------------------------------------

    @fp32_math
    def forward(self, x: Tensor, mask: Tensor | None = None) -> QuantizerOutput:
        check_input(x, self.dim, mask, "FSQ")
        noise_p = self.noise_dropout if self.training else 0.0
        quantized, digits, t = self._quantize(x, noise_p)
        # Indices come from the clean digits, computed before any noise.
        indices = self.digits_to_indices(digits)
        sq_error = ((digits - t) * self._code_mult / self._code_denom) ** 2
        error = sq_error.mean() if mask is None else sq_error.mean(-1)[mask].sum() / mask.sum().clamp_min(1)
        if mask is not None:
            quantized = quantized * mask.unsqueeze(-1)
            indices = indices.masked_fill(~mask, -1)
        return QuantizerOutput(
            quantized=quantized.to(x.dtype),
            indices=indices,
            loss=torch.zeros((), device=x.device),
            losses={},
            stats=code_stats(indices, self.codebook_size, mask=mask, error=error),
        )

    @torch.no_grad()
    @fp32_math
    def encode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        check_input(x, self.dim, mask, "FSQ")
        _, digits, _ = self._quantize(x)
        indices = self.digits_to_indices(digits)
        return indices if mask is None else indices.masked_fill(~mask, -1)

    @torch.no_grad()
    @fp32_math
    def decode(self, indices: Tensor) -> Tensor:
        """Indices ``(...)`` -> quantized vectors ``(..., dim)``; ``-1`` decodes to zeros."""
        check_indices(indices, self.codebook_size, "FSQ")
        valid = indices >= 0
        codes_t = self.indices_to_codes(indices.clamp_min(0)).reshape(-1, self.codebook_dim).t().contiguous()
        w_out = b_out = None
        if self._has_projection:
            w_out = self.project_out.weight.float()  # type: ignore[union-attr]
            b_out = self.project_out.bias.float()  # type: ignore[union-attr]
        # Same layout and kernel as the forward pass, so decode(encode(x)) matches it bit for bit.
        out = _project_out(codes_t, w_out, b_out)
        return out.reshape(*indices.shape, self.dim) * valid.unsqueeze(-1)
