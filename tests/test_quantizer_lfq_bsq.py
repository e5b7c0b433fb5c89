"""LFQ and BSQ: decode equals forward in eval, bit order, the factorised entropies against
a brute-force softmax over the whole codebook, uniform usage gives log K, grouped entropy
upper-bounds the joint one, the entropy loss spreads a collapsed code distribution, and
bad arguments."""

import math

import pytest
import torch
from tessera.core.quantizers import BSQ, LFQ
from tessera.core.quantizers.lfq import bit_entropies, bits_to_indices, indices_to_bits


@pytest.mark.parametrize("cls", [LFQ, BSQ])
@pytest.mark.parametrize("dim,bits", [(6, 6), (16, 6)])
def test_decode_equals_forward_in_eval(cls: type, dim: int, bits: int) -> None:
    q = cls(dim, bits=bits).eval()
    x = torch.randn(3, 17, dim)
    out = q(x)
    assert torch.equal(q.encode(x), out.indices)
    assert torch.equal(q.decode(out.indices), out.quantized)
    mask = torch.rand(3, 17) > 0.3
    masked = q(x, mask)
    assert (masked.indices[~mask] == -1).all() and (masked.quantized[~mask] == 0).all()
    assert torch.equal(q.decode(masked.indices), masked.quantized)
    padded = q.train()(x, torch.zeros(3, 17, dtype=torch.bool))  # a fully padded batch
    assert float(padded.loss.detach()) == 0 and (padded.indices == -1).all()


def test_bit_order_is_little_endian_and_codes_are_signs() -> None:
    q = LFQ(bits=5).eval()
    x = -torch.ones(5, 5) + 2 * torch.eye(5)  # row i: only channel i positive
    assert q.encode(x).tolist() == [1, 2, 4, 8, 16]
    assert torch.equal(q(x).quantized, x)
    idx = torch.randint(0, 2**40, (100,))
    assert torch.equal(bits_to_indices(indices_to_bits(idx, 40)), idx)


def test_bsq_codes_lie_on_the_unit_sphere() -> None:
    q = BSQ(bits=9).eval()
    out = q(torch.randn(50, 9))
    torch.testing.assert_close(out.quantized.norm(dim=-1), torch.ones(50))
    assert torch.allclose(out.quantized.abs(), torch.full((50, 9), 1 / 3))


def _brute_force_entropies(logits_scale: float, z: torch.Tensor, codes: torch.Tensor) -> tuple[float, float]:
    """Softmax of -tau ||z - c||^2 over every code, in float64."""
    d2 = torch.cdist(z.double(), codes.double()) ** 2
    p = torch.softmax(-logits_scale * d2, dim=-1)
    h = lambda p: float(-(p * p.clamp_min(1e-300).log()).sum(-1).mean())  # noqa: E731
    return h(p), h(p.mean(0))


@pytest.mark.parametrize("cls", [LFQ, BSQ])
def test_entropies_match_brute_force_softmax_over_the_codebook(cls: type) -> None:
    torch.manual_seed(3)
    bits, tau = 6, 2.0
    q = cls(bits=bits, inv_temperature=tau, entropy_group_size=bits).train()
    x = torch.randn(200, bits) * 0.3
    out = q(x)
    z = q._latent(x)
    codes = torch.where(indices_to_bits(torch.arange(2**bits), bits), q.code_value, -q.code_value)
    per_sample, codebook = _brute_force_entropies(tau, z, codes)
    assert abs(float(out.losses["per_sample_entropy"]) - per_sample) < 1e-4
    assert abs(float(out.losses["codebook_entropy"]) - codebook) < 1e-4
    expected = 0.25 * out.losses["commitment"] + 0.1 * (per_sample - codebook)
    assert abs(float(out.loss) - float(expected)) < 1e-4


@pytest.mark.parametrize("group_size", [8, 3, 1])
def test_uniform_usage_gives_entropy_log_k(group_size: int) -> None:
    bits = 8
    every = indices_to_bits(torch.arange(2**bits), bits).float() * 2 - 1
    per_sample, codebook = bit_entropies(every * 40, group_size)  # confident, every code once
    assert float(per_sample) < 1e-6
    assert abs(float(codebook) - bits * math.log(2)) < 1e-5


def test_grouped_entropy_upper_bounds_the_joint_entropy() -> None:
    torch.manual_seed(0)
    for trial in range(5):
        # Correlated bits make the factorised approximation strictly larger.
        shared = torch.randn(300, 1)
        logits = 3 * (shared + 0.5 * torch.randn(300, 8)) + trial * 0.2
        _, joint = bit_entropies(logits, 8)
        previous = float(joint)
        for g in (4, 2, 1):
            _, grouped = bit_entropies(logits, g)
            assert float(grouped) >= previous - 1e-5
            previous = float(grouped)
        assert previous > float(joint) + 0.1


def test_bsq_with_many_bits_uses_grouped_entropy() -> None:
    q = BSQ(32, bits=48).train()  # 2**48 codes: exact entropy is impossible, groups of 8 are cheap
    out = q(torch.randn(64, 32))
    assert q.entropy_group_size == 8
    assert out.stats.counts is None and out.indices.max() < 2**48
    assert 0 < float(out.losses["codebook_entropy"].detach()) <= 48 * math.log(2)
    out.loss.backward()


@pytest.mark.parametrize("cls", [LFQ, BSQ])
def test_entropy_loss_spreads_a_collapsed_code_distribution(cls: type) -> None:
    torch.manual_seed(0)
    bits = 6
    z = torch.nn.Parameter(torch.randn(512, bits) * 0.01 + 0.3)  # every token starts on one code
    q = cls(bits=bits, entropy_weight=1.0, commitment_weight=0.0, inv_temperature=5.0).train()
    opt = torch.optim.Adam([z], lr=0.05)
    start = float(q(z).stats.utilization)
    for _ in range(60):
        loss = q(z).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = q.eval()(z.detach()).stats
    assert start < 0.05
    assert float(end.utilization) > 0.6, end
    assert float(end.perplexity) > 25


def test_bad_arguments_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="pass dim .* or bits"):
        LFQ()
    with pytest.raises(ValueError, match=r"bits=20 .*entropy_group_size <= 16"):
        LFQ(bits=20)
    with pytest.raises(ValueError, match="bits is 0"):
        BSQ(bits=0)
    with pytest.raises(ValueError, match="inv_temperature is -1"):
        LFQ(bits=4, inv_temperature=-1)
    q = BSQ(8, bits=4)
    with pytest.raises(ValueError, match=r"last dimension is 4.*dim=8"):
        q(torch.randn(2, 4))
    with pytest.raises(ValueError, match="NaN/inf"):
        q(torch.full((2, 8), float("inf")))
    with pytest.raises(ValueError, match=r"indices span \[-2, 3\]"):
        q.decode(torch.tensor([-2, 3]))


def test_debug_presets_and_config_round_trip() -> None:
    for cls in (LFQ, BSQ):
        q = cls.debug()
        assert q.codebook_size == 64
        assert cls(**q.config()).config() == q.config()
