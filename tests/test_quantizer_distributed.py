"""Data-parallel codebook learning: two gloo ranks, each with half of every batch, must end
with the codebook one process learns from the whole batches (k-means init, EMA updates and
dead-code restarts included), and the sampling helpers must behave as documented."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tessera.core.checkpoint import load_tensors, save_tensors
from tessera.core.quantizers import distributed
from tessera.core.quantizers.vq import VectorQuantizer

STEPS = 8
BATCH = 96
DIM = 3
CODES = 12


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    """STEPS batches of 4 tight blobs; after 3 steps the data moves to 4 new blobs, so
    the codes fitted to the old blobs die and get restarted. Some tokens are padding."""
    g = torch.Generator().manual_seed(1)
    old = torch.randn(4, DIM, generator=g) * 5
    new = torch.randn(4, DIM, generator=g) * 5 + 20
    xs = []
    for step in range(STEPS):
        centres = old if step < 3 else new
        which = torch.randint(0, 4, (BATCH,), generator=g)
        xs.append(centres[which] + 0.1 * torch.randn(BATCH, DIM, generator=g))
    # On a 1/64 grid, every sum the quantizer forms is exact in fp32, so the order in which
    # ranks add their partial sums cannot flip a nearest-code decision.
    x = torch.round(torch.stack(xs) * 64) / 64  # (STEPS, BATCH, DIM)
    mask = torch.rand(STEPS, BATCH, generator=g) > 0.2
    x[~mask] = 1e3  # padding garbage that must never reach the codebook
    return x, mask


def _build() -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(DIM, CODES, kmeans_init=True, kmeans_iters=3, restart_dead=True, decay=0.5)


def _train(vq: VectorQuantizer, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    vq.train()
    torch.manual_seed(123)  # the global stream the shared generator draws its seeds from
    for step in range(STEPS):
        vq(x[step], mask[step])
    return {k: v.detach().clone() for k, v in vq.state_dict().items() if v.is_floating_point()}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, mask = _batches()
        share = BATCH // world
        part = slice(rank * share, (rank + 1) * share)
        state = _train(_build(), x[:, part], mask[:, part])
        save_tensors(os.path.join(out_dir, f"rank{rank}.safetensors"), state)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_learn_the_codebook_of_one_process(tmp_path, monkeypatch) -> None:
    x, mask = _batches()
    restarts = []
    real_sample_rows = distributed.sample_rows
    monkeypatch.setattr(
        distributed,
        "sample_rows",
        lambda z, num, g, **kw: restarts.append(num) or real_sample_rows(z, num, g, **kw),
    )
    single = _train(_build(), x, mask)
    monkeypatch.undo()
    assert restarts, "the data shift should kill codes and trigger at least one restart"
    assert single["embed"].abs().max() < 100, "padding garbage reached the codebook"

    # fork (as DataLoader workers do): the children inherit the imported modules, which
    # keeps this test fast; each child limits itself to one thread. A parent that already
    # holds a process group (an in-process DeepSpeed run earlier in the session) would hand
    # it to forked children, so then start fresh interpreters instead.
    method = "spawn" if dist.is_initialized() else "fork"
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method=method
    )
    ranks = [load_tensors(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    for name in ("embed", "embed_avg", "cluster_size"):
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][name], single[name], rtol=1e-5, atol=1e-5)


def test_sample_rows_draws_distinct_rows_then_repeats_only_when_short() -> None:
    x = torch.arange(20.0).reshape(10, 2)
    g = torch.Generator().manual_seed(0)
    picked = distributed.sample_rows(x, 10, g)
    assert sorted(picked[:, 0].tolist()) == list(range(0, 20, 2)), (
        "without replacement: every row exactly once"
    )
    many = distributed.sample_rows(x, 25, g)
    assert many.shape == (25, 2) and set(many[:, 0].tolist()) <= set(range(0, 20, 2))
    with pytest.raises(ValueError, match="no rows"):
        distributed.sample_rows(x[:0], 3, g)


def test_weighted_rows_follow_the_weights_and_fall_back_to_uniform() -> None:
    x = torch.arange(8.0).reshape(4, 2)
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.0, 3.0, 0.0, 1.0])
    rows = (distributed.sample_rows_weighted(x, weights, 4000, g)[:, 0] // 2).long()
    assert set(rows.tolist()) == {1, 3}, "a zero-weight row was drawn"
    assert 0.72 < (rows == 1).float().mean() < 0.78  # expected 0.75
    uniform = distributed.sample_rows_weighted(x, torch.zeros(4), 400, g)[:, 0] // 2
    assert set(uniform.long().tolist()) == {0, 1, 2, 3}


def test_helpers_are_local_without_a_process_group() -> None:
    assert not distributed.is_distributed()
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum_(t) is t and t.tolist() == [1.0, 2.0]
    assert distributed.rows_per_rank(7) == [7]
    torch.manual_seed(5)
    a = torch.rand(3, generator=distributed.shared_generator())
    torch.manual_seed(5)
    b = torch.rand(3, generator=distributed.shared_generator())
    assert torch.equal(a, b), "the shared generator must follow torch.manual_seed"
