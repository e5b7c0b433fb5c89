"""k-means for codebook initialisation: greedy k-means++ seeding (Arthur & Vassilvitskii
2007, "k-means++: The Advantages of Careful Seeding"), drawn in rounds of many seeds
(about ``4 ln k`` rounds instead of ``k`` steps, in the spirit of k-means||, Bahmani et al.
2012), followed by Lloyd iterations, in fp32, synchronised across data-parallel ranks.

With ``sync=True`` inside an initialised process group, ``W`` ranks each holding a
slice of the points compute the same centroids as one process holding all of them:
seeds are drawn from the union of the slices with a shared generator
(:mod:`.distributed`), and each Lloyd step all-reduces the per-cluster sums and counts.

Also home of :func:`nearest_code`, the one nearest-neighbour search every codebook in
Tessera uses (fused ``||c||^2 - 2 x c^T`` via ``addmm``, chunked to bound memory).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed

__all__ = ["nearest_code", "kmeans"]

Distance = Literal["euclidean", "cosine"]

_CHUNK_ELEMENTS = 1 << 25
"""Largest distance matrix (rows x codes) computed in one piece: 128 MiB of fp32."""


def nearest_code(x: Tensor, codes: Tensor, distance: Distance = "euclidean") -> Tensor:
    """Index of the nearest row of ``codes`` (K, d) for every row of ``x`` (N, d), shape (N,).

    Euclidean: argmin of ``||c||^2 - 2 x.c`` (``||x||^2`` is the same for every code).
    Cosine: argmax of ``x.c`` (callers pass unit-norm rows). Both in the dtype given
    (callers pass fp32). Ties go to the lowest index."""
    sq = None if distance == "cosine" else (codes * codes).sum(1)
    rows = max(1, _CHUNK_ELEMENTS // max(1, codes.shape[0]))
    if x.shape[0] <= rows:
        return _nearest_block(x, codes, sq)
    return torch.cat([_nearest_block(chunk, codes, sq) for chunk in x.split(rows)])


def _nearest_block(x: Tensor, codes: Tensor, sq: Tensor | None) -> Tensor:
    if sq is None:  # cosine: the largest dot product
        return torch.argmax(x @ codes.t(), dim=1)
    return torch.argmin(torch.addmm(sq, x, codes.t(), alpha=-2.0), dim=1)  # (N, K) -> (N,)


def _distances(x: Tensor, x_sq: Tensor | None, points: Tensor) -> Tensor:
    """Distance of every row of ``x`` (N, d) to every row of ``points`` (P, d), shape (N, P):
    squared euclidean (``x_sq`` holds ``||x||^2``), or ``1 - cos`` for unit-norm rows
    (``x_sq`` is None)."""
    if x_sq is None:
        return (1.0 - x @ points.t()).clamp_min_(0.0)
    p_sq = (points * points).sum(1)
    return torch.addmm(p_sq, x, points.t(), alpha=-2.0).add_(x_sq.unsqueeze(1)).clamp_min_(0.0)


def _kmeans_pp_seeds(x: Tensor, k: int, distance: Distance, generator: torch.Generator, sync: bool) -> Tensor:
    """Greedy k-means++ drawn in rounds: the first seed uniform; then each round adds
    ``b = max(1, seeds_so_far // 4)`` seeds at once. For each new seed it draws ``2 + log k``
    candidates with probability proportional to their distance to the nearest seed so far
    and keeps the candidate that lowers the total distance most (as scikit-learn does; one
    draw alone often lands two seeds in one blob and none in another).

    The first 8 seeds come one per round, exactly as sequential greedy k-means++; after
    that a round's seeds are chosen against the seeds of the earlier rounds only, which
    takes about ``8 + 4 ln(k / 8)`` rounds, plus a few for dropped seeds (:func:`_spread_out`),
    instead of ``k`` sequential steps (k=1024, N=4096: 32 rounds, 0.5 s instead of 1.0 s of CPU),
    each a few large matrix products instead of many tiny ones."""
    trials = 2 + int(math.log(k))
    x_sq = None if distance == "cosine" else (x * x).sum(1)
    seeds = x.new_empty(k, x.shape[1])
    seeds[:1] = distributed.sample_rows_weighted(
        x, torch.zeros(x.shape[0], device=x.device), 1, generator, sync=sync
    )
    nearest = _distances(x, x_sq, seeds[:1])[:, 0]  # (N,) distance to the nearest seed so far
    done = 1
    while done < k:
        b = min(k - done, max(1, done // 4))
        candidates = distributed.sample_rows_weighted(x, nearest, b * trials, generator, sync=sync)  # (bT, d)
        # Total distance if each candidate alone joined the seeds, in column chunks.
        step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[0]))
        potential = torch.cat(
            [
                torch.minimum(nearest.unsqueeze(1), _distances(x, x_sq, chunk)).sum(0)
                for chunk in candidates.split(step)
            ]
        )
        potential = distributed.all_reduce_sum_(potential, sync=sync).view(b, trials)
        best = candidates.view(b, trials, -1)[torch.arange(b, device=x.device), potential.argmin(1)]  # (b, d)
        best = best[_spread_out(best, seeds[:done], distance)]
        b = best.shape[0]
        seeds[done : done + b] = best
        nearest = torch.minimum(nearest, _distances(x, x_sq, best).min(1).values)
        done += b
    return seeds


def _spread_out(new: Tensor, seeds: Tensor, distance: Distance) -> Tensor:
    """Which rows of ``new`` (b, d), chosen in one round, to keep: row ``j`` is dropped when
    an earlier row of the round lies within half its distance to the nearest of ``seeds``
    (it would land a second seed in a region this round already covers; a later round
    draws again). Row 0 is always kept, so every round makes progress."""
    new_sq = None if distance == "cosine" else (new * new).sum(1)
    to_seeds = _distances(new, new_sq, seeds).min(1).values  # (b,)
    between = _distances(new, new_sq, new)  # (b, b)
    earlier = torch.ones_like(between, dtype=torch.bool).triu(1)  # [i, j]: i < j
    crowded = (between < 0.25 * to_seeds.unsqueeze(0)) & earlier  # squared distances: half the distance
    return ~crowded.any(0)


def kmeans(
    x: Tensor,
    num_clusters: int,
    *,
    iters: int = 10,
    distance: Distance = "euclidean",
    generator: torch.Generator | None = None,
    sync: bool = True,
) -> tuple[Tensor, Tensor]:
    """Cluster the rows of ``x`` (N, d) (the union over ranks when distributed).

    Returns ``(centroids (num_clusters, d), counts (num_clusters,))`` in fp32, ``counts``
    being the cluster sizes of the last assignment (summed over ranks). A cluster that
    loses all its points keeps its previous centroid. For ``distance="cosine"`` pass
    unit-norm rows; centroids are renormalised after each step. With fewer points than
    clusters some seeds repeat (their clusters stay empty)."""
    if num_clusters < 1:
        raise ValueError(f"kmeans: num_clusters is {num_clusters}; it must be at least 1")
    if iters < 0:
        raise ValueError(f"kmeans: iters is {iters}; it must be >= 0 (0 keeps the k-means++ seeds)")
    x = x.detach().float()
    if sum(distributed.rows_per_rank(x.shape[0], x.device, sync=sync)) == 0:
        raise ValueError("kmeans: there are no points on any rank (every token is masked); pass real data")
    if generator is None:
        generator = distributed.shared_generator(x.device, sync=sync)
    centroids = _kmeans_pp_seeds(x, num_clusters, distance, generator, sync)
    counts = torch.zeros(num_clusters, device=x.device)
    for _ in range(iters):
        assign = nearest_code(x, centroids, distance)
        stats = torch.zeros(num_clusters, x.shape[1] + 1, device=x.device)
        stats[:, :-1].index_add_(0, assign, x)
        stats[:, -1] = torch.bincount(assign, minlength=num_clusters).float()
        distributed.all_reduce_sum_(stats, sync=sync)
        sums, counts = stats[:, :-1], stats[:, -1]
        means = sums / counts.clamp_min(1.0).unsqueeze(1)
        if distance == "cosine":
            means = F.normalize(means, dim=1)
        centroids = torch.where(counts.unsqueeze(1) > 0, means, centroids)
    if iters == 0:
        counts = torch.bincount(nearest_code(x, centroids, distance), minlength=num_clusters).float()
        distributed.all_reduce_sum_(counts, sync=sync)
    return centroids, counts
