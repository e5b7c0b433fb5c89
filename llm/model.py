"""The Tessera LLM: a Llama-style decoder-only transformer, readable top to bottom.

RMSNorm → rotary positions (RoFormer) → grouped-query attention (Ainslie et al., "GQA")
through ``F.scaled_dot_product_attention`` → SwiGLU MLP (Shazeer, "GLU Variants Improve
Transformer") → block → config → model, as in Llama (Touvron et al., 2023).

Conventions worth knowing:

* Rotary embeddings use the "rotate half" layout of Hugging Face Llama: the head
  dimension is split into two halves that rotate together, so the exported weights
  need no permutation (see ``llm/export.py``).
* The query/key/value projections are one fused matrix (``attn.qkv``) and the SwiGLU
  gate and up projections are one (``mlp.gate_up``): fewer kernel launches per token,
  which is what bounds decoding speed at batch 1. The exporter splits them.
* ``segment_ids`` make attention block-diagonal causal, so packed documents never
  attend to each other; ``positions`` restart at each document.
* A :class:`KVCache` is a static cache: preallocated buffers written in place.
* The vocabulary grows append-only (:meth:`TesseraLM.resize_vocab`); old rows never move.

The model knows nothing of DeepSpeed; ``llm/train.py`` wraps it.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checkpoint import load_json, load_tensors, save_json, save_tensors
from ..core.vocab import ManifestMismatchError, diff_manifests

__all__ = ["LLMConfig", "Linear", "RMSNorm", "Attention", "MLP", "Block", "KVCache", "TesseraLM", "rope_cache"]


class Linear(nn.Linear):
    """``nn.Linear`` that decodes faster on the CPU.

    With a handful of rows (decoding: one token per sequence), CPU BLAS multiplies by a
    contiguous (in, out) matrix faster than by the transposed view ``F.linear`` uses
    (measured on 2 cores at cpu-small, one row: 0.23 ms vs 0.66 ms for the 11k x 256
    head; a whole decode step 5.0 → 4.3 ms at batch 1, 9.7 → 8.9 ms at batch 8). So in
    inference mode on the CPU with at most ``FEW_ROWS`` rows it multiplies by a
    transposed copy of its weight, made on first use and remade whenever the weight
    changes (another tensor, or written in place: its version counter moves). The copy
    doubles the weight memory while it lives; :meth:`TesseraLM.drop_decode_copies` frees it.
    Training, autograd, the GPU and ``torch.compile`` (whose generated code multiplies by
    the weight as it is) always take ``F.linear``."""

    FEW_ROWS = 16

    def forward(self, x: Tensor) -> Tensor:
        if (not torch.compiler.is_compiling() and x.device.type == "cpu" and torch.is_inference_mode_enabled()
                and not self.weight.is_inference() and x.numel() <= self.FEW_ROWS * x.shape[-1]):
            y = x @ self._transposed()
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    def _transposed(self) -> Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape))
        cached = self.__dict__.get("_weight_t")  # (weight, key, copy): a plain attribute, never saved
        if cached is None or cached[0]() is not w or cached[1] != key:
            cached = (weakref.ref(w), key, w.detach().t().contiguous())
            self.__dict__["_weight_t"] = cached
        return cached[2]

    def drop_copy(self) -> None:
        """Forget the transposed copy; needed after writes the version counter misses
        (``weight.data`` arithmetic, as peft's LoRA merge does)."""
        self.__dict__.pop("_weight_t", None)

    def _apply(self, fn: Any, recurse: bool = True) -> Linear:  # .to(), .half(), .cuda(): a new weight
        self.drop_copy()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:  # deepcopy and pickling leave the copy behind
        state = super().__getstate__()
        state.pop("_weight_t", None)
        return state


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich), computed in fp32 like HF Llama."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).type_as(x)


def rope_cache(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and signed sin tables, each (max_len, head_dim), in the rotate-half layout: the
    pair (x[i], x[i + hd/2]) rotates by angle pos * theta^(-2i/hd). The sin table carries
    the sign of ``rotate_half`` (-sin on the first half), so applying it needs no negation."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (L, hd/2)
    return torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([-freqs.sin(), freqs.sin()], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """x (B, T, heads, hd); cos, signed_sin (B, T, 1, hd). Swapping the halves and
    multiplying by the signed sin is HF's ``rotate_half(x) * sin``."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x2, x1)
    return torch.addcmul(x * cos, swapped, signed_sin).type_as(x)  # fp32 tables keep bf16 x bf16


class KVCache:
    """A static KV cache: per layer, key and value buffers (B, n_kv_heads, max_len, head_dim)
    written in place. ``pos`` counts the filled positions. ``key_valid`` (B, max_len) marks
    which cached positions may be attended to (False for left padding); ``padded`` says
    whether any is False, so unpadded batches skip the mask."""

    def __init__(self, config: LLMConfig, batch_size: int, max_len: int, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if max_len > config.max_seq_len:
            raise ValueError(f"KV cache length {max_len} exceeds the model's max_seq_len "
                             f"{config.max_seq_len}; shorten the prompt or max_new_tokens")
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.padded = False
        self.pos = 0
        self.max_len = max_len

    def reset(self) -> None:
        self.key_valid.fill_(True)
        self.padded = False
        self.pos = 0


class Attention(nn.Module):
    """Grouped-query self-attention: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, c: LLMConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.qkv = Linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=False)
        self.proj = Linear(c.n_heads * c.head_dim, c.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: tuple[Tensor, Tensor] | None = None, pos: int = 0) -> Tensor:
        B, T, _ = x.shape
        H, KV = self.n_heads, self.n_kv_heads
        qkv = self.qkv(x).view(B, T, H + 2 * KV, self.head_dim)
        qk = apply_rope(qkv[:, :, : H + KV], cos, sin)  # (B, T, H+KV, hd), q and k rotated at once
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, hd)
        k = qk[:, :, H:].transpose(1, 2)  # (B, KV, T, hd)
        v = qkv[:, :, H + KV :].transpose(1, 2)  # (B, KV, T, hd)
        if cache is not None:
            k_buf, v_buf = cache
            k_buf[:, :, pos : pos + T] = k
            v_buf[:, :, pos : pos + T] = v
            k, v = k_buf[:, :, : pos + T], v_buf[:, :, : pos + T]  # (B, KV, S, hd)
        # no mask and several queries: the fused causal path (the cache is empty then)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=H != KV)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused in one matrix."""

    def __init__(self, c: LLMConfig) -> None:
        super().__init__()
        self.gate_up = Linear(c.dim, 2 * c.ffn_dim, bias=False)
        self.down = Linear(c.ffn_dim, c.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, ffn) each
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: LLMConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.attn = Attention(c)
        self.mlp_norm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: tuple[Tensor, Tensor] | None = None, pos: int = 0) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, pos)
        return x + self.mlp(self.mlp_norm(x))


@dataclass(kw_only=True)
class LLMConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int  # SwiGLU hidden size
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LLMConfig.{name}={getattr(self, name)} must be positive")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                             f"pick n_heads dividing dim")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                             f"grouped-query attention shares each kv head among n_heads/n_kv_heads queries")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (dim/n_heads) must be even for rotary positions")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LLMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LLMConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, vocab_size: int) -> LLMConfig:
        """Named sizes: "debug" (tests), "cpu-small" (the default bundle, ~10-20M params on
        a 2-core CPU), "150m", "400m", "1b" (GPU users; counts include a ~32k vocabulary)."""
        presets: dict[str, dict[str, Any]] = {
            "debug": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=256),
            "cpu-small": dict(dim=256, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=768, max_seq_len=1024,
                              tie_embeddings=True),
            "150m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048, max_seq_len=2048),
            "400m": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, ffn_dim=2816, max_seq_len=2048),
            "1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=8, ffn_dim=5632, max_seq_len=2048,
                       rope_theta=500000.0),
        }
        if name not in presets:
            raise ValueError(f"unknown LLM preset {name!r}; choose one of {sorted(presets)}")
        return cls(vocab_size=vocab_size, **presets[name])


class TesseraLM(nn.Module):
    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.lm_head = Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_cache(c.head_dim, c.max_seq_len, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, hd)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.manifest_hash: str | None = None  # set by from_pretrained
        self._frozen_rows = 0
        self._freeze_hooks: list[Any] = []
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; the residual output projections are scaled by
        1/sqrt(2 * n_layers) (GPT-2) so the residual stream does not grow with depth."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def forward(self, ids: Tensor, *, positions: Tensor | None = None, segment_ids: Tensor | None = None,
                kv_cache: KVCache | None = None, last_only: bool = False) -> Tensor:
        """ids (B, T) → logits (B, T, V), or (B, 1, V) with ``last_only``.

        positions (B, T): rotary positions (default 0..T-1, offset by the cache's fill);
        segment_ids (B, T): document index per token, attention stays inside a document;
        kv_cache: keys/values are written at ``kv_cache.pos`` and attention covers the
        cache so far (masked by ``kv_cache.key_valid``); ``pos`` advances by T.
        """
        B, T = ids.shape
        pos = kv_cache.pos if kv_cache is not None else 0
        if pos + T > (kv_cache.max_len if kv_cache is not None else self.config.max_seq_len):
            raise ValueError(f"sequence of {pos + T} tokens exceeds the limit "
                             f"{kv_cache.max_len if kv_cache is not None else self.config.max_seq_len}; "
                             f"truncate the input or use a model with a larger max_seq_len")
        if positions is None:
            cos = self.rope_cos[pos : pos + T][None, :, None]  # (1, T, 1, hd)
            sin = self.rope_sin[pos : pos + T][None, :, None]
        else:
            cos = self.rope_cos[positions][:, :, None]  # (B, T, 1, hd)
            sin = self.rope_sin[positions][:, :, None]
        mask = self._mask(ids, segment_ids, kv_cache)
        x = self.tok_emb(ids)  # (B, T, C)
        for i, block in enumerate(self.layers):
            cache = (kv_cache.k[i], kv_cache.v[i]) if kv_cache is not None else None
            x = block(x, cos, sin, mask, cache, pos)
        if kv_cache is not None:
            kv_cache.pos = pos + T
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return self.lm_head(x)  # (B, T, V)

    @staticmethod
    def _mask(ids: Tensor, segment_ids: Tensor | None, kv_cache: KVCache | None) -> Tensor | None:
        """Boolean attention mask (B, 1, T, S), True = may attend, or None for plain causal."""
        T = ids.shape[1]
        if segment_ids is not None:
            if kv_cache is not None:
                raise ValueError("segment_ids and kv_cache cannot be combined; generate one document "
                                 "per row instead of packing")
            if segment_ids.shape != ids.shape:
                raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} must equal ids shape "
                                 f"{tuple(ids.shape)}")
            causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
            same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
            return (same & causal)[:, None]
        if kv_cache is None or (not kv_cache.padded and (T == 1 or kv_cache.pos == 0)):
            return None
        pos = kv_cache.pos
        S = pos + T
        valid = kv_cache.key_valid[:, None, None, :S]  # (B, 1, 1, S)
        if T == 1:
            return valid
        q_idx = torch.arange(pos, S, device=ids.device)[:, None]  # (T, 1)
        k_idx = torch.arange(S, device=ids.device)[None, :]  # (1, S)
        # a padded query still attends to itself, so no row is fully masked (SDPA would give NaN)
        return (valid & (k_idx <= q_idx)) | (k_idx == q_idx)

    # ---- depth growth ----

    @torch.no_grad()
    def grow_depth(self, every: int = 2) -> TesseraLM:
        """A deeper copy that computes the same function (block expansion, Wu et al. 2024,
        "LLaMA Pro"): after every ``every``-th block goes a copy of it whose output
        projections (``attn.proj``, ``mlp.down``) are zero, so at first it adds nothing to
        the residual stream; fine-tuning then puts the new blocks to use. ``n_layers``
        becomes ``n + n // every`` (every=2: 8 → 12, every=1: 8 → 16). The model itself is
        left as it was; embedding rows marked frozen are not carried over."""
        n = self.config.n_layers
        if isinstance(every, bool) or not isinstance(every, int) or not 1 <= every <= n:
            raise ValueError(f"every={every!r} must be an integer in [1, {n}] (the model has {n} layers): a copy "
                             f"goes after every every-th layer, e.g. 2 grows {n} → {n + n // 2} layers")
        config = LLMConfig.from_dict({**self.config.to_dict(), "n_layers": n + n // every})
        grown = TesseraLM(config).to(device=self.tok_emb.weight.device, dtype=self.tok_emb.weight.dtype)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("layers.")}
        j = 0
        for i, block in enumerate(self.layers):
            copies = [block.state_dict()]
            if (i + 1) % every == 0:
                zeroed = dict(copies[0])
                for name in ("attn.proj.weight", "mlp.down.weight"):
                    zeroed[name] = torch.zeros_like(zeroed[name])
                copies.append(zeroed)
            for sd in copies:
                state.update({f"layers.{j}.{k}": v.clone() for k, v in sd.items()})
                j += 1
        if config.tie_embeddings:
            state.pop("lm_head.weight", None)
        missing, unexpected = grown.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:
            raise RuntimeError(f"grow_depth: state does not fit the grown model: missing {missing}, unexpected {unexpected}")
        grown.manifest_hash = self.manifest_hash
        return grown.train(self.training)

    # ---- vocabulary growth ----

    @torch.no_grad()
    def resize_vocab(self, new_size: int, *, freeze_old: bool = False, noise_std: float = 0.01) -> None:
        """Grow the vocabulary append-only: rows [0, old) are kept bit for bit, new rows are
        the mean of the old rows plus N(0, noise_std * row std) noise (embedding, and the
        output head when untied).

        ``freeze_old`` registers a gradient hook that zeroes the gradient of the old rows,
        so an optimizer leaves them unchanged — with zero gradients Adam's update is zero,
        but AdamW's decoupled weight decay still shrinks them: give the embedding and head
        weight_decay=0 (a no-decay group) when training with frozen rows.
        """
        old = self.config.vocab_size
        if new_size < old:
            raise ValueError(f"resize_vocab({new_size}) would shrink the vocabulary of {old}; the "
                             f"vocabulary is append-only, pass a size >= {old}")
        if new_size == old and not freeze_old:
            return
        kept = torch.arange(old)
        self.remap_vocab(new_size, kept, kept, noise_std=noise_std)
        self._frozen_rows = old if freeze_old else 0
        if freeze_old:
            params = {id(p): p for p in (self.tok_emb.weight, self.lm_head.weight)}
            self._freeze_hooks = [p.register_hook(self._zero_frozen_grad) for p in params.values()]

    @torch.no_grad()
    def remap_vocab(self, new_size: int, old_ids: Tensor, new_ids: Tensor, *, noise_std: float = 0.01,
                    generator: torch.Generator | None = None) -> None:
        """Rebuild the vocabulary rows of the embedding (and untied head) for a vocabulary of
        ``new_size``: row ``new_ids[i]`` takes old row ``old_ids[i]`` bit for bit, every other
        row starts at the mean of the old rows plus N(0, noise_std * row std) noise. Used to
        grow the vocabulary (:meth:`resize_vocab`) and when a modality's tokenizer is replaced
        and the ids after it move (``tessera.pipelines.bundle.replace_modality``). Rows marked
        frozen by an earlier ``resize_vocab(freeze_old=True)`` are unfrozen: their ids may move."""
        old = self.config.vocab_size
        old_ids, new_ids = torch.as_tensor(old_ids).long().reshape(-1), torch.as_tensor(new_ids).long().reshape(-1)
        if old_ids.numel() != new_ids.numel():
            raise ValueError(f"remap_vocab: {old_ids.numel()} old ids but {new_ids.numel()} new ids; pair each kept "
                             f"row's old id with its new id")
        if old_ids.numel() and not (0 <= int(old_ids.min()) and int(old_ids.max()) < old):
            raise ValueError(f"remap_vocab: old ids span [{int(old_ids.min())}, {int(old_ids.max())}], outside the "
                             f"model's vocabulary [0, {old})")
        if new_ids.numel() and not (0 <= int(new_ids.min()) and int(new_ids.max()) < new_size):
            raise ValueError(f"remap_vocab: new ids span [{int(new_ids.min())}, {int(new_ids.max())}], outside the "
                             f"new vocabulary [0, {new_size})")
        if new_ids.unique().numel() != new_ids.numel():
            raise ValueError("remap_vocab: a new id is given twice; each new row can take one old row")
        fresh = torch.ones(new_size, dtype=torch.bool)
        fresh[new_ids] = False

        def rebuilt(w: Tensor) -> nn.Parameter:
            mean, std = w.mean(0), w.std(0).mean()
            out = torch.empty(new_size, w.shape[1], device=w.device, dtype=w.dtype)
            out[new_ids.to(w.device)] = w[old_ids.to(w.device)]
            noise = torch.randn(int(fresh.sum()), w.shape[1], generator=generator, device=w.device, dtype=w.dtype)
            out[fresh.to(w.device)] = (mean + noise_std * std * noise).to(w.dtype)
            return nn.Parameter(out)

        self.tok_emb.weight = rebuilt(self.tok_emb.weight)
        self.tok_emb.num_embeddings = new_size
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        else:
            self.lm_head.weight = rebuilt(self.lm_head.weight)
        self.lm_head.out_features = new_size
        self.config.vocab_size = new_size
        for h in self._freeze_hooks:
            h.remove()
        self._freeze_hooks = []
        self._frozen_rows = 0

    def _zero_frozen_grad(self, grad: Tensor) -> Tensor:
        grad = grad.clone()
        grad[: self._frozen_rows] = 0
        return grad

    def drop_decode_copies(self) -> None:
        """Free the transposed weight copies that CPU decoding made (see :class:`Linear`)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.drop_copy()

    # ---- accounting ----

    def num_params(self, *, embedding: bool = True) -> int:
        """Parameter count (shared tied weights counted once); without the input embedding
        table when ``embedding`` is False."""
        n = sum(p.numel() for p in self.parameters())
        if not embedding and not self.config.tie_embeddings:
            n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B:
        6 * matmul params + 12 * n_layers * dim * seq_len (attention scores and values)."""
        c = self.config
        T = seq_len or c.max_seq_len
        matmul_params = self.num_params() - (0 if c.tie_embeddings else self.tok_emb.weight.numel())
        matmul_params -= sum(p.numel() for n, p in self.named_parameters() if n.endswith("norm.weight"))
        return 6 * matmul_params + 12 * c.n_layers * c.dim * T

    # ---- checkpoints ----

    def save_pretrained(self, folder: str | os.PathLike, *, manifest_hash: str,
                        manifest: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> None:
        """config.json (config + "manifest_hash") and model.safetensors (a tied head is not stored);
        with ``manifest``, also manifest.json, so a later mismatch can say what differs."""
        folder = Path(folder)
        if manifest is not None:
            if manifest.get("hash") != manifest_hash:
                raise ValueError(f"manifest has hash {manifest.get('hash')}, but manifest_hash={manifest_hash}; "
                                 f"pass the manifest of the vocabulary the model was trained with")
            save_json(folder / "manifest.json", manifest)
        state = {k: (v.to(dtype) if dtype is not None else v) for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight")
        save_tensors(folder / "model.safetensors", state, metadata={"manifest_hash": manifest_hash})
        save_json(folder / "config.json", {**self.config.to_dict(), "manifest_hash": manifest_hash})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, expected_manifest_hash: str | None = None,
                        expected_manifest: dict[str, Any] | None = None,
                        device: torch.device | str = "cpu") -> TesseraLM:
        """Load a folder written by :meth:`save_pretrained` (fp32). When an expected manifest
        (hash or dict) is given and the checkpoint was trained with another, raises
        ``ManifestMismatchError`` naming both hashes: its token ids would mean other things."""
        folder = Path(folder)
        raw = load_json(folder / "config.json")
        stored = raw.pop("manifest_hash", None)
        if expected_manifest is not None and expected_manifest_hash is None:
            expected_manifest_hash = expected_manifest.get("hash")
        if expected_manifest_hash is not None and stored != expected_manifest_hash:
            what = ""
            if expected_manifest is not None and (folder / "manifest.json").is_file():
                differences = diff_manifests(load_json(folder / "manifest.json"), expected_manifest)
                what = " What differs (trained → in use): " + "; ".join(differences[:10]) + "."
            raise ManifestMismatchError(
                f"{folder}: the model was trained with manifest {stored}, but the vocabulary in use has "
                f"manifest {expected_manifest_hash}; token ids would decode to the wrong things.{what} Load the "
                f"bundle this model was trained with, or resize and fine-tune it for this vocabulary")
        model = cls(LLMConfig.from_dict(raw))
        state = load_tensors(folder / "model.safetensors")
        if model.config.tie_embeddings:
            state["lm_head.weight"] = state["tok_emb.weight"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder}/model.safetensors does not match its config.json: missing "
                             f"{missing}, unexpected {unexpected}; the checkpoint is corrupt or mixed")
        model.manifest_hash = stored
        return model.to(device)
