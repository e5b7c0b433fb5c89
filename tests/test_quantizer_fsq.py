"""FSQ: index bijection for every recommended level set (fp32 and bf16), code values,
little-endian radix order, straight-through gradients of the fused kernel, noise that
leaves the indices alone, masks, a codebook too large to materialise, and bad arguments."""

import math

import pytest
import torch
from tessera.core.quantizers import FSQ
from tessera.core.quantizers.fsq import RECOMMENDED_LEVELS


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("size", sorted(RECOMMENDED_LEVELS))
def test_index_bijection_for_every_recommended_level_set(size: int, symmetric: bool) -> None:
    levels = FSQ.recommended_levels(size)
    q = FSQ(levels, symmetric=symmetric)
    assert q.codebook_size == math.prod(levels)
    assert 0.9 <= q.codebook_size / size <= 1.1
    every = torch.arange(q.codebook_size)
    codes = q.indices_to_codes(every)
    assert codes.shape == (q.codebook_size, len(levels))
    assert codes.min() >= -1 and codes.max() <= 1
    assert torch.equal(q.codes_to_indices(codes), every)
    # bf16 codes (e.g. 1/3 is not representable) still map back to the same index.
    assert torch.equal(q.codes_to_indices(codes.bfloat16()), every)
    # Distinct indices give distinct codes: the map is one-to-one.
    assert torch.unique(codes, dim=0).shape[0] == q.codebook_size


@pytest.mark.parametrize("symmetric", [False, True])
def test_decode_encode_equals_forward_in_eval_fp32_and_bf16(symmetric: bool) -> None:
    q = FSQ([8, 5, 5, 5], dim=16, symmetric=symmetric).eval()
    x = torch.randn(4, 33, 16) * 2
    out = q(x)
    assert torch.equal(q.encode(x), out.indices)
    assert torch.equal(q.decode(out.indices), out.quantized)
    xb = x.bfloat16()
    out_b = q(xb)
    assert out_b.quantized.dtype == torch.bfloat16
    # Quantization runs in fp32: bf16 input gives the indices of its exact fp32 value.
    assert torch.equal(out_b.indices, q(xb.float()).indices)
    assert torch.equal(q.decode(out_b.indices).bfloat16(), out_b.quantized)


def test_code_values_and_little_endian_radix() -> None:
    q = FSQ([5, 4])
    assert q.indices_to_codes(torch.arange(5))[:, 0].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert q.indices_to_codes(torch.arange(0, 20, 5))[:, 1].tolist() == [-1.0, -0.5, 0.0, 0.5]
    sym = FSQ([4], symmetric=True).indices_to_codes(torch.arange(4))[:, 0]
    torch.testing.assert_close(sym, torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    digits = torch.tensor([[1, 0], [0, 1], [4, 3]])
    assert q.digits_to_indices(digits).tolist() == [1, 5, 4 + 3 * 5]
    assert torch.equal(q.indices_to_digits(q.digits_to_indices(digits)), digits)


def test_zero_input_maps_to_zero_code_for_odd_levels() -> None:
    q = FSQ([7, 5, 3]).eval()
    assert torch.equal(q(torch.zeros(2, 3)).quantized, torch.zeros(2, 3))


@pytest.mark.parametrize("bound", ["tanh", "clamp"])
def test_fused_gradients_match_plain_autograd(bound: str) -> None:
    torch.manual_seed(1)
    q = FSQ([8, 5, 5, 5], dim=12, bound=bound)
    x = torch.randn(64, 12, requires_grad=True)
    g = torch.randn(64, 12)
    q(x).quantized.backward(g)
    fused = [x.grad.clone()] + [p.grad.clone() for p in q.parameters()]

    # The same map written with ordinary autograd ops and a straight-through round.
    x.grad = None
    q.zero_grad()
    z = q.project_in(x) + q._shift
    bounded = torch.tanh(z) if bound == "tanh" else z.clamp(-1, 1)
    t = bounded * q._a + q._b
    digits = t + (t.round() - t).detach()
    q.project_out((digits * q._code_mult + q._neg_center) / q._code_denom).backward(g)
    plain = [x.grad] + [p.grad for p in q.parameters()]
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_noise_dropout_changes_values_not_indices() -> None:
    q = FSQ([8, 8, 8], symmetric=True, noise_dropout=1.0)
    x = torch.randn(500, 3)
    clean = q.eval()(x)
    noisy = q.train()(x)
    assert torch.equal(noisy.indices, clean.indices)
    diff = (noisy.quantized - clean.quantized).abs()
    assert diff.max() > 0
    step = 2 / 7
    assert diff.max() <= step + 1e-5  # at most one bin away


def test_mask_gives_minus_one_zeros_and_clean_stats() -> None:
    q = FSQ([5, 5], dim=6)
    x = torch.randn(3, 10, 6)
    mask = torch.rand(3, 10) > 0.4
    out = q(x, mask)
    assert (out.indices[~mask] == -1).all() and (out.indices[mask] >= 0).all()
    assert (out.quantized[~mask] == 0).all()
    assert out.stats.counts.sum() == mask.sum()
    assert torch.equal(q.decode(out.indices)[~mask], torch.zeros(int((~mask).sum()), 6))


def test_huge_implicit_codebook_is_never_materialised() -> None:
    q = FSQ([16] * 8)  # 2**32 codes
    assert q.codebook_size == 2**32
    x = torch.randn(100, 8)
    out = q(x)
    assert out.stats.counts is None and 0 < out.stats.utilization <= 100 / 2**32
    assert torch.equal(q.decode(out.indices), out.quantized)
    assert out.indices.max() < 2**32


def test_fsq_autoencoder_learns_low_dimensional_data() -> None:
    torch.manual_seed(0)
    basis = torch.randn(3, 16)
    q = FSQ([8, 8, 8], dim=16)
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)

    def batch() -> torch.Tensor:
        return (torch.rand(128, 3) * 2 - 1) @ basis

    with torch.no_grad():
        before = (q(batch()).quantized - batch()).pow(2).mean()
    for _ in range(150):
        x = batch()
        loss = (q(x).quantized - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = batch()
    after = (q.eval()(x).quantized - x).pow(2).mean()
    assert after < 0.1 * before, (before, after)
    assert q(x).stats.utilization > 0.2


def test_bad_arguments_raise_value_errors_naming_value_and_fix() -> None:
    with pytest.raises(ValueError, match=r"levels\[1\] is 1.*>= 2.*recommended_levels"):
        FSQ([5, 1, 3])
    with pytest.raises(ValueError, match="levels is empty"):
        FSQ([])
    with pytest.raises(ValueError, match=r"codebook_size=300.*2\^10=1024"):
        FSQ.recommended_levels(300)
    q = FSQ([5, 5], dim=6)
    with pytest.raises(ValueError, match=r"last dimension is 5.*dim=6.*movedim"):
        q(torch.randn(2, 5))
    bad = torch.randn(2, 6)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/inf"):
        q(bad)
    with pytest.raises(ValueError, match=r"indices span \[0, 25\].*0\.\.24"):
        q.decode(torch.tensor([0, 25]))
    with pytest.raises(ValueError, match="noise_dropout is 2"):
        FSQ([5], noise_dropout=2)


def test_debug_preset_and_config_round_trip() -> None:
    q = FSQ.debug()
    assert q.codebook_size == 60
    clone = FSQ(**q.config())
    assert clone.config() == q.config()
