"""Vector quantization: nearest-code lookup in a learned codebook (van den Oord et al. 2017,
"Neural Discrete Representation Learning", VQ-VAE), with the refinements Tessera uses:

* **Distance**: euclidean, or cosine (inputs and codes on the unit sphere; "Vector-quantized
  Image Modeling with Improved VQGAN", Yu et al. 2021), optionally in a low-dimensional
  codebook space reached by a linear projection in and out (``codebook_dim``).
* **Codebook learning**: exponential moving averages of cluster sizes and sums with
  Laplace smoothing (VQ-VAE appendix; Razavi et al. 2019), or a gradient codebook trained
  by the codebook loss ``||sg(z) - q||^2``.
* **SimVQ** (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized
  Models with One Linear Layer"): codes are ``W(basis)`` for a frozen random basis and a
  learned linear map ``W``, so every step updates the whole codebook; ``decode`` uses the
  mapped codes.
* **k-means initialisation** on the first training batch (k-means++ seeds + Lloyd).
* **Dead-code restart** (on by default, except for SimVQ): a code whose EMA usage falls
  below a threshold is replaced by a random (unmasked) input of the current batch. The EMA
  update never moves a code no token chose (the reference library's Laplace-smoothed EMA
  slowly shrinks such codes to the origin, an implicit revival); the restart is the
  explicit mechanism that brings them back. The default threshold scales with the
  tokens per batch divided by the codebook size (a fixed threshold marks every code dead
  when the codebook is much larger than the batch, and restarts churn forever).
* **Gradients**: straight-through, or the **rotation trick** (Fifty et al. 2024,
  "Restructuring Vector Quantization with the Rotation Trick"): the output is
  ``sg(lambda R) e`` with ``R`` the rotation taking ``e`` to the code's direction and
  ``lambda = ||q|| / ||e||``, so the encoder sees ``lambda R^T g`` instead of ``g``.
* **Padding masks** (``True`` = real token): masked tokens take no part in EMA statistics,
  k-means, restarts, losses or statistics, come back as zeros and get index ``-1``.
* **Data parallel**: EMA statistics are all-reduced and k-means / restart draws are shared
  across ranks (:mod:`.distributed`), so W ranks match one process with the whole batch.

Losses compare the *codebook-space* input ``z`` (projected and, for cosine, normalised)
with its code ``q``: ``commitment = ||z - sg(q)||^2`` and, for a gradient codebook,
``codebook = ||sg(z) - q||^2``. (vector-quantize-pytorch compares the commitment term
against the raw, unprojected input when a mask is given; ``test_quantizer_vq.py`` keeps a
regression test for that.) All quantization math is fp32 with autocast off; ``quantized``
comes back in the input dtype. ``eval()`` mode never changes a buffer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .base import Quantizer, QuantizerOutput, check_input, code_stats
from .kmeans import kmeans, nearest_code

__all__ = ["VQConfig", "VectorQuantizer", "rotate_to"]

Distance = Literal["euclidean", "cosine"]
Gradient = Literal["ste", "rotation"]

_TINY = 1e-12
"""Norms below this count as zero (rotation trick and cosine normalisation guards)."""

_DEFAULT_RESTART_FRACTION = 0.1
"""Default dead-code threshold, as a fraction of a uniformly used code's share of a batch."""


@dataclass(kw_only=True)
class VQConfig:
    """Everything that defines a :class:`VectorQuantizer` (JSON-serialisable).

    ``restart_dead=None`` (the default) restarts dead codes unless ``simvq`` (whose codebook
    is a learned map of a frozen basis). ``restart_threshold`` is in tokens per batch (the EMA
    of how many tokens of a global batch chose the code); ``None`` means
    ``0.1 * tokens_per_batch / codebook_size``.
    ``codebook_weight`` only applies to a gradient codebook (``ema=False`` or ``simvq``).
    """

    dim: int
    codebook_size: int
    codebook_dim: int | None = None
    distance: Distance = "euclidean"
    ema: bool = True
    decay: float = 0.99
    eps: float = 1e-5
    kmeans_init: bool = False
    kmeans_iters: int = 10
    restart_dead: bool | None = None
    restart_threshold: float | None = None
    gradient: Gradient = "ste"
    simvq: bool = False
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0
    sync_distributed: bool = True

    def __post_init__(self) -> None:
        who = "VectorQuantizer"
        if self.restart_dead is None:  # the EMA alone never moves an unused code: restart it instead
            self.restart_dead = not self.simvq
        for name in ("dim", "codebook_size", "kmeans_iters"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{who}: {name} is {v!r}; it must be an int")
        if self.dim < 1:
            raise ValueError(f"{who}: dim is {self.dim}; it must be >= 1 (the size of the input's last axis)")
        if self.codebook_size < 2:
            raise ValueError(
                f"{who}: codebook_size is {self.codebook_size}; a codebook needs at least 2 codes, "
                f"pass codebook_size >= 2"
            )
        if self.codebook_dim is not None and (
            not isinstance(self.codebook_dim, int)
            or isinstance(self.codebook_dim, bool)
            or self.codebook_dim < 1
        ):
            raise ValueError(
                f"{who}: codebook_dim is {self.codebook_dim!r}; pass a positive int, or None to use dim={self.dim}"
            )
        if self.distance not in ("euclidean", "cosine"):
            raise ValueError(f"{who}: distance is {self.distance!r}; choose 'euclidean' or 'cosine'")
        if self.gradient not in ("ste", "rotation"):
            raise ValueError(
                f"{who}: gradient is {self.gradient!r}; choose 'ste' (straight-through) or 'rotation' (rotation trick)"
            )
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(
                f"{who}: decay is {self.decay}; it must be in [0, 1] (0.99 is typical, 1 freezes the EMA)"
            )
        if not self.eps > 0.0:
            raise ValueError(f"{who}: eps is {self.eps}; Laplace smoothing needs eps > 0 (1e-5 is typical)")
        if self.kmeans_iters < 0:
            raise ValueError(f"{who}: kmeans_iters is {self.kmeans_iters}; it must be >= 0")
        if self.restart_threshold is not None and not self.restart_threshold >= 0.0:
            raise ValueError(
                f"{who}: restart_threshold is {self.restart_threshold}; it must be >= 0 tokens per batch, "
                f"or None for the default 0.1 * tokens_per_batch / codebook_size"
            )
        for name in ("commitment_weight", "codebook_weight"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{who}: {name} is {getattr(self, name)}; loss weights must be >= 0")
        if self.simvq:
            clash = [n for n in ("ema", "kmeans_init", "restart_dead") if getattr(self, n)]
            if clash:
                raise ValueError(
                    f"{who}: simvq=True learns its codebook through the linear map by gradient, which does not "
                    f"combine with {', '.join(f'{n}=True' for n in clash)}; pass "
                    f"{', '.join(f'{n}=False' for n in clash)}"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"VQConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    @classmethod
    def debug(cls) -> VQConfig:
        """A tiny configuration for tests and CPU smoke runs."""
        return cls(dim=8, codebook_size=16, kmeans_init=True, kmeans_iters=2, restart_dead=True)


def rotate_to(e: Tensor, q: Tensor) -> Tensor:
    """Rotation-trick gradient estimator (Fifty et al. 2024, section 4.2), rows of shape (N, d).

    The value is exactly ``q``; the gradient with respect to ``e`` is ``lambda R^T g`` where
    ``R = I - 2 w w^T + 2 v u^T`` (``u = e/||e||``, ``v = q/||q||``, ``w = (u+v)/||u+v||``)
    rotates ``u`` onto ``v`` and ``lambda = ||q|| / ||e||``; ``R`` and ``lambda`` are constants.
    Guards: rows with ``e = 0`` or ``q = 0`` fall back to straight-through (identity);
    antiparallel rows (``u + v = 0``, no unique rotation) use the reflection ``I - 2 u u^T``,
    which also maps ``u`` to ``v``. ``q`` is treated as a constant."""
    q = q.detach()
    with torch.no_grad():
        e_norm = e.detach().norm(dim=-1, keepdim=True)
        q_norm = q.norm(dim=-1, keepdim=True)
        ok = (e_norm > _TINY) & (q_norm > _TINY)
        u = torch.where(ok, e.detach() / e_norm.clamp_min(_TINY), 0.0)
        v = torch.where(ok, q / q_norm.clamp_min(_TINY), 0.0)
        s = u + v
        s_norm = s.norm(dim=-1, keepdim=True)
        w = torch.where(s_norm > 1e-6, s / s_norm.clamp_min(_TINY), 0.0)
        lam = torch.where(ok, q_norm / e_norm.clamp_min(_TINY), 1.0)
    rotated = lam * (e - 2.0 * (e * w).sum(-1, keepdim=True) * w + 2.0 * (e * u).sum(-1, keepdim=True) * v)
    return q + (rotated - rotated.detach())


class VectorQuantizer(Quantizer):
    """Nearest-neighbour vector quantizer; see the module docstring for every option.

    ``forward(x, mask)`` takes ``x`` of shape ``(..., dim)`` and returns
    :class:`~.base.QuantizerOutput` with ``indices`` of shape ``x.shape[:-1]``.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook_dim: int | None = None,
        distance: Distance = "euclidean",
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        restart_dead: bool | None = None,
        restart_threshold: float | None = None,
        gradient: Gradient = "ste",
        simvq: bool = False,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        sync_distributed: bool = True,
    ) -> None:
        super().__init__()
        cfg = VQConfig(
            dim=dim,
            codebook_size=codebook_size,
            codebook_dim=codebook_dim,
            distance=distance,
            ema=ema,
            decay=decay,
            eps=eps,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            restart_dead=restart_dead,
            restart_threshold=restart_threshold,
            gradient=gradient,
            simvq=simvq,
            commitment_weight=commitment_weight,
            codebook_weight=codebook_weight,
            sync_distributed=sync_distributed,
        )
        self.config = cfg
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_codebooks = 1
        self.codebook_dim = cd = codebook_dim or dim
        self.cosine = distance == "cosine"
        self.learnable_codebook = simvq or not ema
        self.tracks_usage = ema or cfg.restart_dead

        self.project_in = nn.Linear(dim, cd) if cd != dim else None
        self.project_out = nn.Linear(cd, dim) if cd != dim else None

        if simvq:
            # Frozen random basis (std 1/sqrt(d), as in the paper) and the learned map W,
            # drawn first so that a seed gives the same codebook as vector-quantize-pytorch.
            self.register_buffer("basis", torch.randn(codebook_size, cd) * cd**-0.5)
            self.simvq_map = nn.Linear(cd, cd, bias=False)
        else:
            # Codes start small, uniform in +-sqrt(6 / (K * d)), inside the encoder's output
            # cloud, so the first nearest-code searches split the inputs by direction. A wider
            # start leaves most codes outside the data and unused (measured on a digits
            # autoencoder with the rotation trick: 2% of the codes used with a +-sqrt(6 / d)
            # start, 88% with this).
            bound = math.sqrt(6.0 / (codebook_size * cd))
            init = torch.empty(codebook_size, cd).uniform_(-bound, bound)
            if self.cosine:
                init = F.normalize(init, dim=1)
            if ema:
                self.register_buffer("embed", init)
                self.register_buffer("embed_avg", init.clone())
            else:
                self.embed = nn.Parameter(init)
        if self.tracks_usage:
            # EMA of how many tokens per (global) batch chose each code; set on the first batch.
            self.register_buffer("cluster_size", torch.zeros(codebook_size))
        # False until the first training batch has initialised the codebook statistics.
        self.register_buffer("initted", torch.tensor(False))

    @classmethod
    def from_config(cls, config: VQConfig) -> VectorQuantizer:
        d = config.to_dict()
        return cls(d.pop("dim"), d.pop("codebook_size"), **d)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={c.dim}, codebook_size={c.codebook_size}, codebook_dim={self.codebook_dim}, "
            f"distance={c.distance}, {'simvq' if c.simvq else 'ema' if c.ema else 'gradient codebook'}, "
            f"gradient={c.gradient}, kmeans_init={c.kmeans_init}, restart_dead={c.restart_dead}"
        )

    # --- codebook space ---------------------------------------------------------------

    def codebook(self) -> Tensor:
        """The code vectors in codebook space, ``(codebook_size, codebook_dim)`` fp32: mapped
        by ``W`` for SimVQ, unit-norm for cosine. Carries gradients for a learned codebook."""
        codes = self.simvq_map(self.basis.float()) if self.config.simvq else self.embed.float()
        return F.normalize(codes, dim=1, eps=_TINY) if self.cosine else codes

    def _to_codebook_space(self, x: Tensor) -> Tensor:
        """(N, dim) input -> (N, codebook_dim) fp32 codebook-space vectors."""
        z = x.float()
        if self.project_in is not None:
            z = self.project_in(z)
        return F.normalize(z, dim=1, eps=_TINY) if self.cosine else z

    def _from_codebook_space(self, q: Tensor) -> Tensor:
        return self.project_out(q) if self.project_out is not None else q

    # --- forward ------------------------------------------------------------------------

    def forward(self, x: Tensor, mask: Tensor | None = None) -> QuantizerOutput:
        check_input(x, self.dim, mask, "VectorQuantizer")
        shape, dtype = x.shape, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            z = self._to_codebook_space(x.reshape(-1, self.dim))  # (N, cd)
            valid = None if mask is None else mask.reshape(-1)
            z_v = z if valid is None else z[valid]  # (M, cd): the real tokens
            sync = self.config.sync_distributed
            if self.training and not bool(self.initted):
                self._initialise(z_v.detach(), sync)

            codes = self.codebook()  # (K, cd)
            idx = nearest_code(z_v.detach(), codes.detach(), self.config.distance)  # (M,)
            q = F.embedding(idx, codes)  # (M, cd), differentiable for a learned codebook

            commitment = _mse(z_v, q.detach())
            losses = {"commitment": commitment}
            loss = self.config.commitment_weight * commitment
            if self.learnable_codebook:
                losses["codebook"] = _mse(q, z_v.detach())
                loss = loss + self.config.codebook_weight * losses["codebook"]

            if self.training and self.tracks_usage:
                self._update(z_v.detach(), idx, sync)

            if not z_v.requires_grad:
                out_v = q.detach()
            elif self.config.gradient == "rotation":
                out_v = rotate_to(z_v, q)
            else:
                out_v = q.detach() + (z_v - z_v.detach())  # straight-through; the value is exactly q
            out_v = self._from_codebook_space(out_v)  # (M, dim)

            if valid is None:
                out, indices = out_v, idx
            else:
                out = out_v.new_zeros(valid.shape[0], self.dim).index_put((valid,), out_v)
                indices = torch.full_like(valid, -1, dtype=torch.long).index_put_((valid,), idx)
        indices = indices.reshape(shape[:-1])
        stats = code_stats(indices, self.codebook_size, error=commitment)
        return QuantizerOutput(
            quantized=out.reshape(shape).to(dtype), indices=indices, loss=loss, losses=losses, stats=stats
        )

    @torch.no_grad()
    def encode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Indices of shape ``x.shape[:-1]`` (``-1`` where ``mask`` is False). Never updates
        the codebook, even in training mode."""
        check_input(x, self.dim, mask, "VectorQuantizer.encode")
        with torch.autocast(x.device.type, enabled=False):
            z = self._to_codebook_space(x.reshape(-1, self.dim))
            idx = nearest_code(z, self.codebook(), self.config.distance)
        if mask is not None:
            idx = idx.masked_fill(~mask.reshape(-1), -1)
        return idx.reshape(x.shape[:-1])

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """Code vectors ``(*indices.shape, dim)`` in fp32; ``-1`` decodes to zeros."""
        if not torch.is_tensor(indices) or indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"VectorQuantizer.decode: expected an integer tensor of indices, got "
                f"{indices.dtype if torch.is_tensor(indices) else type(indices).__name__}"
            )
        if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"VectorQuantizer.decode: indices span [{int(indices.min())}, {int(indices.max())}], but this "
                f"codebook has codes 0..{self.codebook_size - 1} (and -1 for padding); check which tokenizer "
                f"produced them"
            )
        flat = indices.reshape(-1).long()
        real = flat >= 0
        out = self._from_codebook_space(F.embedding(flat.clamp_min(0), self.codebook()))
        out = torch.where(real.unsqueeze(1), out, 0.0) if not bool(real.all()) else out
        return out.reshape(*indices.shape, self.dim)

    # --- codebook learning (training mode only) ---------------------------------------------

    @torch.no_grad()
    def _initialise(self, z: Tensor, sync: bool) -> None:
        """First training batch: k-means (optional) and the usage statistics' starting point.

        Without k-means every code starts with the weight of one token (as in the VQ-VAE
        EMA of vector-quantize-pytorch), whatever the batch size: the first updates then
        move a chosen code most of the way to the mean of its tokens. A uniform share of
        the batch, ``n / K`` tokens, held codes near their random start for tens of steps
        (digits autoencoder, K=256, 1024 tokens per batch, decay 0.95, 150 steps: 13% of
        the codes used instead of 20%). With a dead-code threshold above one token (the
        default when a batch has more than 10 tokens per code), every code the first batch
        did not choose is restarted on a real input at once."""
        n = float(distributed.all_reduce_sum_(torch.tensor(float(z.shape[0]), device=z.device), sync=sync))
        if n == 0:
            return  # nothing real to learn from yet; try again on the next batch
        K = self.codebook_size
        if self.config.kmeans_init:
            centroids, counts = kmeans(
                z, K, iters=self.config.kmeans_iters, distance=self.config.distance, sync=sync
            )
            self.embed.copy_(centroids)
        else:
            counts = torch.ones(K, device=z.device)
        if self.tracks_usage:
            self.cluster_size.copy_(counts)
        if self.config.ema:
            self.embed_avg.copy_(self.embed * counts.unsqueeze(1))
        self.initted.fill_(True)

    @torch.no_grad()
    def _update(self, z: Tensor, idx: Tensor, sync: bool) -> None:
        """EMA usage (and, with ``ema=True``, codebook) update, then dead-code restart.

        Codes that no token chose in this (global) batch keep their vectors exactly: plain
        EMA would shrink them towards the origin through the Laplace smoothing."""
        K, c = self.codebook_size, self.config
        counts = torch.bincount(idx, minlength=K).float()  # (K,)
        if c.ema:
            sums = torch.zeros(K, self.codebook_dim, device=z.device).index_add_(0, idx, z)  # (K, cd)
            if distributed.is_distributed(sync):
                packed = distributed.all_reduce_sum_(torch.cat([sums, counts.unsqueeze(1)], 1))
                sums, counts = packed[:, :-1], packed[:, -1]
        else:
            distributed.all_reduce_sum_(counts, sync=sync)
        n = float(counts.sum())
        if n == 0:
            return  # an all-padding batch carries no information
        if c.ema:
            self.embed_avg.lerp_(sums, 1.0 - c.decay)
        self.cluster_size.lerp_(counts, 1.0 - c.decay)
        if c.ema:
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + c.eps) / (total + K * c.eps) * total  # Laplace smoothing
            means = self.embed_avg / smoothed.unsqueeze(1)
            if self.cosine:
                means = F.normalize(means, dim=1, eps=_TINY)
            self.embed.copy_(torch.where(counts.unsqueeze(1) > 0, means, self.embed))
        if c.restart_dead:
            self._restart_dead(z, n, sync)

    def dead_threshold(self, tokens_per_batch: float) -> float:
        """EMA usage (tokens per global batch) below which a code counts as dead."""
        if self.config.restart_threshold is not None:
            return self.config.restart_threshold
        return _DEFAULT_RESTART_FRACTION * tokens_per_batch / self.codebook_size

    @torch.no_grad()
    def _restart_dead(self, z: Tensor, n: float, sync: bool) -> None:
        """Replace dead codes by random real inputs of this batch (the same on every rank).

        A restarted code gets the usage of a uniformly used code (at least twice the
        threshold), so it has time to attract tokens before it can be declared dead again.
        With more dead codes than tokens, a random subset of them is restarted now."""
        threshold = self.dead_threshold(n)
        dead = (self.cluster_size < threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        generator = distributed.shared_generator(z.device, sync=sync)
        if dead.numel() > n:
            dead = dead[torch.randperm(dead.numel(), generator=generator)[: int(n)].to(dead.device)]
        fresh = distributed.sample_rows(z, dead.numel(), generator, sync=sync)  # unit-norm for cosine
        reset = max(n / self.codebook_size, 2.0 * threshold)
        if self.config.ema:
            self.embed[dead] = fresh
            self.embed_avg[dead] = fresh * reset
        else:
            # A learned codebook is already in this step's autograd graph (e.g. through the
            # cosine normalisation): write through .data so backward still runs.
            self.embed.data[dead] = fresh
        self.cluster_size[dead] = reset


def _mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error, zero (not NaN) when every token is masked."""
    if a.numel() == 0:
        return a.sum() * 0.0
    return F.mse_loss(a, b)
