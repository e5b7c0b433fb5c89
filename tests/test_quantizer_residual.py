"""Residual and grouped quantizers: the output is the sum of the level outputs, prefixes
decode (and get finer with every level), quantizer dropout keeps prefixes, grouped
indices match per-slice quantizers, eval never changes a buffer, and bad arguments."""

from itertools import pairwise

import pytest
import torch
from tessera.core.quantizers import (
    BSQ,
    FSQ,
    LFQ,
    GroupedQuantizer,
    ResidualQuantizer,
    VectorQuantizer,
)


def _blobs(n: int = 512, dim: int = 8) -> torch.Tensor:
    centers = torch.randn(16, dim, generator=torch.Generator().manual_seed(7)) * 3
    return centers[torch.randint(0, 16, (n,))] + 0.3 * torch.randn(n, dim)


def _trained_rvq(**kwargs) -> ResidualQuantizer:
    rq = ResidualQuantizer(8, 4, codebook_size=16, kind="vq", kmeans_init=True, **kwargs)
    rq.train()
    data = _blobs()
    for _ in range(5):
        rq(data)
    return rq.eval()


@pytest.mark.parametrize("kind", ["vq", "fsq"])
def test_output_is_the_sum_of_level_outputs(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "vq":
        rq = _trained_rvq()
    else:
        rq = ResidualQuantizer(3, 3, kind="fsq", levels=[5, 5, 5]).eval()
    x = _blobs(100, 8) if kind == "vq" else torch.randn(100, 3)
    out = rq(x)
    # Re-run the levels by hand: each quantizes what the previous ones left.
    residual = rq._to_levels(x)
    total = torch.zeros_like(residual)
    for level, layer in enumerate(rq.layers):
        scale = rq._scale(level)
        q = layer(residual / scale).quantized * scale
        assert torch.equal(layer.encode(residual / scale), out.indices[..., level])
        residual = residual - q
        total = total + q
    torch.testing.assert_close(rq._from_levels(total), out.quantized, rtol=0, atol=1e-6)
    assert torch.equal(rq.decode(out.indices), out.quantized)
    assert torch.equal(rq.encode(x), out.indices)
    assert out.indices.shape == (100, 3 if kind == "fsq" else 4)


def test_prefix_decode_matches_fewer_levels_and_error_shrinks() -> None:
    torch.manual_seed(0)
    rq = _trained_rvq()
    x = _blobs(256)
    full = rq(x)
    errors = []
    for k in range(1, 5):
        prefix = rq.decode(full.indices[..., :k])
        assert torch.equal(prefix, rq(x, n_levels=k).quantized)
        errors.append(float((prefix - x).pow(2).mean()))
    assert all(b < a for a, b in pairwise(errors)), errors
    assert errors[-1] < 0.5 * errors[0]


def test_residual_fsq_error_shrinks_geometrically() -> None:
    rq = ResidualQuantizer(4, 3, kind="fsq", levels=[9, 9, 9, 9]).eval()
    x = torch.rand(1000, 4) * 1.6 - 0.8
    target = torch.tanh(x)
    idx = rq(x).indices
    errs = [float((rq.decode(idx[..., :k]) - target).abs().max()) for k in (1, 2, 3)]
    for a, b in pairwise(errs):
        assert b <= a / 8 * 1.01, errs  # each level of 9 values refines by (9 - 1)
    assert errs[-1] <= 8**-3 * 1.01


def test_quantizer_dropout_keeps_prefixes() -> None:
    torch.manual_seed(0)
    rq = ResidualQuantizer(8, 5, codebook_size=16, kind="vq", quantizer_dropout=1.0)
    rq.train()
    x = torch.randn(64, 10, 8)
    out = rq(x)
    kept = (out.indices >= 0).sum(-1)  # (64, 10)
    # Every token of a batch element keeps the same prefix; dropped levels are -1 and zero.
    assert (kept == kept[:, :1]).all()
    assert torch.equal(out.indices >= 0, torch.arange(5) < kept.unsqueeze(-1))
    assert kept.min() >= 1 and kept[:, 0].unique().numel() >= 3
    rq.eval()
    assert (rq(x).indices >= 0).all()  # no dropout in eval


def test_quantizer_dropout_per_batch_keeps_one_prefix_for_the_whole_batch() -> None:
    torch.manual_seed(0)
    rq = ResidualQuantizer(8, 5, codebook_size=16, kind="vq", quantizer_dropout=1.0, dropout_per="batch")
    rq.train()
    x = torch.randn(16, 10, 8)
    kept_per_batch = []
    for _ in range(12):
        kept = (rq(x).indices >= 0).sum(-1)  # (16, 10)
        assert (kept == kept[0, 0]).all(), "every element of a batch keeps the same levels"
        kept_per_batch.append(int(kept[0, 0]))
    assert min(kept_per_batch) >= 1 and len(set(kept_per_batch)) >= 3  # but batches differ
    assert ResidualQuantizer(8, 2, codebook_size=16, dropout_per="batch").config()["dropout_per"] == "batch"


def test_masked_tokens_get_minus_one_at_every_level() -> None:
    rq = ResidualQuantizer(8, 3, codebook_size=16, kind="vq")
    x = torch.randn(4, 6, 8)
    mask = torch.rand(4, 6) > 0.5
    out = rq(x, mask)
    assert (out.indices[~mask] == -1).all() and (out.indices[mask] >= 0).all()
    assert (out.quantized[~mask] == 0).all()
    assert torch.equal(rq.eval().decode(rq(x, mask).indices), rq(x, mask).quantized)


def test_grouped_indices_match_per_slice_quantizers() -> None:
    torch.manual_seed(0)
    gq = GroupedQuantizer(12, 3, codebook_size=32, kind="vq", kmeans_init=True)
    x = torch.randn(200, 12)
    gq.train()(x)
    gq.eval()
    out = gq(x)
    assert out.indices.shape == (200, 3) and gq.num_codebooks == 3
    for g, q in enumerate(gq.quantizers):
        assert torch.equal(q.encode(x[:, 4 * g : 4 * g + 4]), out.indices[:, g])
    assert torch.equal(gq.decode(out.indices), out.quantized)
    assert out.stats.counts.shape == (3, 32)


@pytest.mark.parametrize("kind", ["fsq", "lfq", "bsq"])
def test_grouped_implicit_quantizers_round_trip(kind: str) -> None:
    extra = {"levels": [5, 3]} if kind == "fsq" else {"bits": 3}
    gq = GroupedQuantizer(8, 2, kind=kind, **extra).eval()
    x = torch.randn(5, 7, 8)
    out = gq(x)
    assert out.indices.shape == (5, 7, 2)
    assert torch.equal(gq.decode(out.indices), out.quantized)


def _quantizers() -> list[torch.nn.Module]:
    return [
        VectorQuantizer(8, 32, restart_dead=True, kmeans_init=True),
        ResidualQuantizer(8, 2, codebook_size=16, kind="vq", restart_dead=True),
        ResidualQuantizer(8, 2, kind="fsq", levels=[5, 5]),
        GroupedQuantizer(8, 2, codebook_size=16, kind="vq"),
        FSQ([5, 5, 5], dim=8),
        LFQ(8, bits=4),
        BSQ(8, bits=4),
    ]


@pytest.mark.parametrize("index", range(7))
def test_eval_never_changes_buffers(index: int) -> None:
    q = _quantizers()[index]
    q.train()(torch.randn(64, 8))  # initialise, as after training
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()
    for _ in range(3):
        q(torch.randn(64, 8) * 3)
    after = q.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_bad_arguments_raise_value_errors() -> None:
    with pytest.raises(ValueError, match=r"kind='vq' needs codebook_size \(got None\)"):
        ResidualQuantizer(8, 2)
    with pytest.raises(ValueError, match="kind is 'pq'"):
        ResidualQuantizer(8, 2, codebook_size=16, kind="pq")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quantizer_dropout is 1.5"):
        ResidualQuantizer(8, 2, codebook_size=16, quantizer_dropout=1.5)
    with pytest.raises(ValueError, match="dropout_per is 'token'"):
        ResidualQuantizer(8, 2, codebook_size=16, dropout_per="token")  # type: ignore[arg-type]
    rq = ResidualQuantizer(8, 2, codebook_size=16)
    with pytest.raises(ValueError, match=r"n_levels is 3, expected 1\.\.2"):
        rq(torch.randn(4, 8), n_levels=3)
    with pytest.raises(ValueError, match=r"shape \(4, 3\).*1 <= k <= 2"):
        rq.decode(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"levels\[0\] is 1"):
        ResidualQuantizer(3, 2, kind="fsq", levels=[1, 5, 5])
    with pytest.raises(ValueError, match=r"dim=10 must be a positive multiple of groups=3"):
        GroupedQuantizer(10, 3, codebook_size=16)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 2\)"):
        GroupedQuantizer(8, 2, codebook_size=16).decode(torch.zeros(4, dtype=torch.long))


def test_debug_presets() -> None:
    assert ResidualQuantizer.debug().num_codebooks == 3
    assert GroupedQuantizer.debug().num_codebooks == 2
