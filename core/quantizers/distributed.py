"""Keeping codebooks identical across data-parallel ranks.

Every rank of a data-parallel job holds a slice of the global batch. A quantizer that
learns its codebook from data (EMA statistics, k-means initialisation, dead-code
restarts) must make the same decision on every rank, or the replicas drift apart. The
helpers here make a quantizer on ``W`` ranks, each holding a slice of the batch, behave
exactly like one process holding the whole batch (the slices concatenated in rank order):

* :func:`all_reduce_sum_` sums statistics (cluster sizes, embedding sums) over ranks.
* :func:`shared_generator` gives every rank the same random stream (rank 0 draws the
  seed from torch's global generator and broadcasts it).
* :func:`sample_rows` and :func:`sample_rows_weighted` draw rows from the union of all
  ranks' rows, identically everywhere: the generator picks *global* row numbers, the
  rank owning each row contributes it, and one all-reduce delivers the rows to everyone.
  Only the chosen rows travel, never the whole batch.

All helpers are no-ops (or plain local computations) when ``torch.distributed`` is not
initialised, the world has one rank, or the caller passes ``sync=False``. Tensors are
communicated on the device they live on, so NCCL gets CUDA tensors and gloo CPU ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed",
    "all_reduce_sum_",
    "shared_generator",
    "rows_per_rank",
    "sample_rows",
    "sample_rows_weighted",
]


def is_distributed(sync: bool = True) -> bool:
    """True when ``sync`` is requested and a process group with more than one rank exists."""
    return sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(t: Tensor, *, sync: bool = True) -> Tensor:
    """Sum ``t`` over ranks in place (and return it); unchanged in a single process."""
    if is_distributed(sync):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shared_generator(device: torch.device | str = "cpu", *, sync: bool = True) -> torch.Generator:
    """A CPU generator seeded identically on every rank.

    Every rank draws a seed from torch's global generator (so all ranks consume their
    global random streams alike) and rank 0's seed is broadcast. In a single process this
    is simply a generator seeded from the global stream, so ``torch.manual_seed`` makes
    runs reproducible and 1-process and W-process runs draw the same numbers."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    if is_distributed(sync):
        seed = seed.to(device)
        dist.broadcast(seed, src=0)
    return torch.Generator().manual_seed(int(seed.item()))


def rows_per_rank(n_local: int, device: torch.device | str = "cpu", *, sync: bool = True) -> list[int]:
    """Number of rows each rank holds, in rank order (``[n_local]`` in a single process)."""
    if not is_distributed(sync):
        return [n_local]
    mine = torch.tensor([n_local], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [int(t.item()) for t in everyone]


def _collect(x: Tensor, rows: Tensor, counts: list[int], sync: bool) -> Tensor:
    """Rows ``rows`` (global row numbers over the rank-ordered union) of ``x``, on every rank."""
    if not is_distributed(sync):
        return x[rows.to(x.device)]
    start = sum(counts[: dist.get_rank()])
    rows = rows.to(x.device)
    mine = (rows >= start) & (rows < start + x.shape[0])
    out = x.new_zeros(rows.shape[0], x.shape[1])
    out[mine] = x[rows[mine] - start]
    return all_reduce_sum_(out)


def sample_rows(x: Tensor, num: int, generator: torch.Generator, *, sync: bool = True) -> Tensor:
    """``num`` rows drawn uniformly from the union of every rank's ``x`` (rank order), the
    same rows on every rank. Without replacement when the union has at least ``num`` rows,
    with replacement otherwise. ``generator`` must be in the same state on every rank
    (see :func:`shared_generator`)."""
    counts = rows_per_rank(x.shape[0], x.device, sync=sync)
    total = sum(counts)
    if total == 0:
        raise ValueError("sample_rows: there are no rows to sample from on any rank (every token is masked)")
    if num <= total:
        rows = torch.randperm(total, generator=generator)[:num]
    else:
        rows = torch.randint(0, total, (num,), generator=generator)
    return _collect(x, rows, counts, sync)


def _per_rank(value: float, device: torch.device, sync: bool) -> Tensor:
    """``value`` of every rank, rank order, as a float64 CPU tensor of shape ``(world,)``."""
    mine = torch.tensor([value], dtype=torch.float64, device=device)
    if not is_distributed(sync):
        return mine.cpu()
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return torch.cat(everyone).cpu()


def sample_rows_weighted(
    x: Tensor, weights: Tensor, num: int, generator: torch.Generator, *, sync: bool = True
) -> Tensor:
    """``num`` rows of the union of every rank's ``x``, drawn with replacement with
    probability proportional to ``weights`` (shape ``(rows,)``, non-negative), or uniformly
    when every weight is zero. Returns ``(num, dim)``, identical on every rank (the
    k-means++ draw). At least one rank must hold a row."""
    weights = weights.double()
    mass = _per_rank(float(weights.sum()), x.device, sync)
    if float(mass.sum()) == 0:  # every row coincides with a seed: draw uniformly
        weights = torch.ones_like(weights)
        mass = _per_rank(float(x.shape[0]), x.device, sync)
    # Global targets in [0, total mass), then the rank owning each and the offset inside it.
    targets = torch.rand(num, generator=generator, dtype=torch.float64) * float(mass.sum())
    rank_end = torch.cumsum(mass, 0)
    owner = torch.searchsorted(rank_end, targets, right=True)
    # Rounding can point past the last rank, or at a rank without mass: use the nearest
    # rank before it that has some.
    last_with_mass = torch.cummax(torch.where(mass > 0, torch.arange(len(mass)), -1), 0).values
    owner = last_with_mass[owner.clamp_max(len(mass) - 1)]
    rank = dist.get_rank() if is_distributed(sync) else 0
    mine = owner == rank
    offsets = (targets[mine] - (rank_end[rank] - mass[rank])).to(x.device)
    rows = torch.searchsorted(torch.cumsum(weights, 0), offsets, right=True).clamp_max(x.shape[0] - 1)
    if not is_distributed(sync):
        return x[rows]
    out = x.new_zeros(num, x.shape[1])
    out[mine.to(x.device)] = x[rows]
    return all_reduce_sum_(out)
