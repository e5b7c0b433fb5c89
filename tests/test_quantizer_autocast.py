"""Quantization math stays in fp32 under autocast: bf16 matmuls inside a quantizer
would give wrong (even out-of-range) indices."""

from __future__ import annotations

import pytest
import torch
from tessera.core.quantizers import BSQ, FSQ, LFQ, GroupedQuantizer, ResidualQuantizer, VectorQuantizer

CASES = {
    "fsq-projected": lambda: FSQ([8, 5, 5, 5], dim=64),
    "fsq-64000": lambda: FSQ([8, 8, 8, 5, 5, 5]),
    "lfq-projected": lambda: LFQ(dim=64, bits=12),
    "lfq-12bit": lambda: LFQ(bits=12),
    "bsq": lambda: BSQ(dim=64, bits=12),
    "vq": lambda: VectorQuantizer(64, 256),
    "residual-fsq": lambda: ResidualQuantizer(64, 3, kind="fsq", levels=[8, 5, 5, 5]),
    "residual-vq": lambda: ResidualQuantizer(64, 3, codebook_size=256),
    "grouped-fsq": lambda: GroupedQuantizer(64, 2, kind="fsq", levels=[8, 5, 5, 5]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_indices_under_bf16_autocast_equal_fp32_indices(name: str) -> None:
    torch.manual_seed(0)
    q = CASES[name]().eval()
    dim = 6 if name == "fsq-64000" else 12 if name == "lfq-12bit" else 64
    x = torch.randn(2000, dim) * 2
    want = q.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = q.encode(x)
        out = q(x)
    assert torch.equal(got, want), f"{int((got != want).sum())} indices differ under autocast"
    assert torch.equal(out.indices, want)
    assert int(want.max()) < q.codebook_size
    assert out.quantized.dtype == x.dtype
