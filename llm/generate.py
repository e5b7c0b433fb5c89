"""Generation for the Tessera LLM: static KV cache, left-padded batches, sampling
(temperature, top-k, nucleus/top-p from Holtzman et al., "The Curious Case of Neural Text
Degeneration"), classifier-free guidance (Ho & Salimans; as used for autoregressive
image tokens by Make-A-Scene and Parti), and the core grammar as a logits mask so every
generated span decodes.

One step of decoding at batch 1 is mostly Python and kernel-dispatch overhead, so the
loop does as little as possible: one :class:`~tessera.llm.model.KVCache` preallocated
for the whole run and written in place, no attention mask at all when no row is padded,
position and input buffers updated in place, sampling settings resolved to tensors once
(a per-row gather per step when they differ between modalities), and one host sync per
step: the stop check (only when an ``eos_id`` is given). With ``compile=True`` the decode
step (the model's forward for one token per row) goes through ``torch.compile`` (inductor,
dynamic shapes: one graph serves every cache fill and every batch size above 1; batch 1
compiles once more), which fuses the
per-layer elementwise work and removes most of the dispatch overhead: on 2 CPU cores at
cpu-small, batch 1, 2.5 → 1.6 ms a token. The first call compiles (tens of seconds, and a
C++ compiler on the CPU), so it pays off for long or repeated generation, not one short
reply; it is off by default.

Per-modality settings: ``sampling`` and ``cfg_scale`` may be dicts keyed by ``"text"``
(everything outside a media span, and the default) and modality names; each row uses the
entry of the span the grammar says it is in (``state.modality``).

Guidance: with ``uncond_prompts`` the batch holds the conditional rows then the
unconditional ones; both get the same sampled token and the logits used for sampling are
``u + s * (c - u)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .model import KVCache, TesseraLM

__all__ = ["SamplingConfig", "GrammarLike", "generate", "stream", "filter_sorted", "left_pad"]


@dataclass(kw_only=True)
class SamplingConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 mean no truncation."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingConfig:
        return cls(**d)

    @classmethod
    def preset(cls, name: str) -> SamplingConfig:
        presets = {"debug": cls(temperature=0.0), "greedy": cls(temperature=0.0),
                   "text": cls(temperature=0.8, top_p=0.95), "media": cls(temperature=1.0, top_k=100)}
        if name not in presets:
            raise ValueError(f"unknown sampling preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]


class GrammarLike(Protocol):
    """What generation needs of ``tessera.core.grammar.Grammar``."""

    modalities: Sequence[str]
    pad_id: int

    def start(self, batch_size: int, prefix: Tensor | None = None) -> Any: ...
    def apply(self, logits: Tensor, state: Any) -> Tensor: ...
    def advance(self, state: Any, tokens: Tensor, *, check: bool = True) -> None: ...


def left_pad(rows: Sequence[Tensor], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Ragged 1-D prompts → ids (R, L) padded on the left, and the pad count per row (R,)."""
    for i, r in enumerate(rows):
        if r.ndim != 1 or r.numel() == 0 or r.dtype != torch.long:
            raise ValueError(f"prompt {i} has shape {tuple(r.shape)} and dtype {r.dtype}; each prompt "
                             f"must be a non-empty 1-D LongTensor of global ids")
    L = max(r.numel() for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, L - r.numel():] = r.to(device)
    n_pad = torch.tensor([L - r.numel() for r in rows], device=device)
    return ids, n_pad


def filter_sorted(logits: Tensor, top_k: Tensor, top_p: Tensor) -> tuple[Tensor, Tensor]:
    """Sort logits (B, V) descending and set everything outside each row's top-k (0 = off)
    and top-p nucleus to -inf; the most likely token always survives.
    Returns (filtered sorted logits, their token ids), both (B, V)."""
    vals, idx = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vals.shape[-1], device=vals.device)
    k = torch.where(top_k > 0, top_k, vals.shape[-1])
    vals.masked_fill_(rank >= k[:, None], float("-inf"))
    probs = vals.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass of the better tokens
    vals.masked_fill_(before >= top_p[:, None], float("-inf"))
    return vals, idx


class _Sampler:
    """Turns (B, V) logits into (B,) tokens with settings per row chosen by modality."""

    def __init__(self, sampling: SamplingConfig | Mapping[str, SamplingConfig],
                 cfg_scale: float | Mapping[str, float], modalities: Sequence[str],
                 has_grammar: bool, device: torch.device, seed: int | None) -> None:
        names = ["text", *modalities]
        configs = self._per_modality("sampling", sampling, names, has_grammar)
        scales = self._per_modality("cfg_scale", cfg_scale, names, has_grammar)
        self.uniform = configs[0] if all(c == configs[0] for c in configs) else None
        self.temperature = torch.tensor([c.temperature for c in configs], device=device)
        self.top_k = torch.tensor([c.top_k for c in configs], device=device)
        self.top_p = torch.tensor([c.top_p for c in configs], device=device)
        self.scale = torch.tensor(scales, dtype=torch.float32, device=device)
        self.uniform_scale = scales[0] if all(s == scales[0] for s in scales) else None
        self.generator = torch.Generator(device).manual_seed(seed) if seed is not None else None

    @staticmethod
    def _per_modality(what: str, value: Any, names: list[str], has_grammar: bool) -> list[Any]:
        if not isinstance(value, Mapping):
            return [value] * len(names)
        unknown = sorted(set(value) - set(names))
        if unknown:
            hint = "" if has_grammar else " (per-modality settings need a grammar to know a row's span)"
            raise ValueError(f"{what} has keys {unknown} that are not 'text' or a modality of the "
                             f"grammar {names[1:]}{hint}")
        if "text" not in value:
            raise ValueError(f"{what} dict needs a 'text' entry, the default outside media spans; "
                             f"got keys {sorted(value)}")
        return [value.get(n, value["text"]) for n in names]

    def guide(self, logits: Tensor, row_kind: Tensor | None) -> Tensor:
        """logits (2B, V), conditional rows first → u + s * (c - u), (B, V)."""
        B = logits.shape[0] // 2
        cond, uncond = logits[:B], logits[B:]
        if self.uniform_scale is not None:
            return torch.lerp(uncond, cond, self.uniform_scale)
        s = self.scale[row_kind + 1] if row_kind is not None else self.scale[:1].expand(B)
        return torch.lerp(uncond, cond, s[:, None])

    def sample(self, logits: Tensor, row_kind: Tensor | None) -> Tensor:
        """logits (B, V) → tokens (B,); row_kind (B,) is the grammar's modality index (-1 text)."""
        cfg = self.uniform
        if cfg is not None:
            if cfg.temperature == 0:
                return logits.argmax(dim=-1)
            logits = logits / cfg.temperature
            if cfg.top_k == 0 and cfg.top_p == 1.0:
                return torch.multinomial(logits.softmax(dim=-1), 1, generator=self.generator)[:, 0]
            if cfg.top_k and cfg.top_p == 1.0:  # the cheap path: no full sort
                vals, idx = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1)
                choice = torch.multinomial(vals.softmax(dim=-1), 1, generator=self.generator)
                return idx.gather(-1, choice)[:, 0]
            B = logits.shape[0]
            k, p = self.top_k[:1].expand(B), self.top_p[:1].expand(B)
        else:
            kind = row_kind + 1 if row_kind is not None else torch.zeros_like(logits[:, 0], dtype=torch.long)
            temperature, k, p = self.temperature[kind], self.top_k[kind], self.top_p[kind]
            logits = logits / temperature.clamp_min(1e-6)[:, None]
        vals, idx = filter_sorted(logits, k, p)
        choice = torch.multinomial(vals.softmax(dim=-1), 1, generator=self.generator)
        tokens = idx.gather(-1, choice)[:, 0]
        if cfg is None:
            tokens = torch.where(temperature == 0, idx[:, 0], tokens)  # greedy rows
        return tokens


@torch.inference_mode()
def stream(model: TesseraLM, prompts: Sequence[Tensor], *, max_new_tokens: int,
           sampling: SamplingConfig | Mapping[str, SamplingConfig] | None = None,
           grammar: GrammarLike | None = None, cfg_scale: float | Mapping[str, float] = 1.0,
           uncond_prompts: Sequence[Tensor] | None = None, eos_id: int | None = None,
           pad_id: int | None = None, seed: int | None = None, compile: bool = False) -> Iterator[Tensor]:
    """Yield the tokens of each step, (B,) per step; a row that has emitted ``eos_id``
    yields ``pad_id`` afterwards. Stops when every row is done or after ``max_new_tokens``.
    ``compile=True``: decode steps run the model through ``torch.compile`` (see the module
    docstring); the prefill stays eager.

    ``pad_id`` (left padding, and the filler after eos) defaults to the grammar's <|pad|>,
    else 0. With a grammar and guidance, the grammar follows the conditional rows; give
    unconditional prompts that end in the same place (e.g. both right after <|begin_image|>)."""
    B = len(prompts)
    if B == 0:
        raise ValueError("no prompts given; pass a list of 1-D LongTensors")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    guided = uncond_prompts is not None
    if guided and len(uncond_prompts) != B:
        raise ValueError(f"{len(uncond_prompts)} uncond_prompts for {B} prompts; classifier-free "
                         f"guidance needs one unconditional prompt per prompt")
    if not guided and cfg_scale != 1.0:
        raise ValueError(f"cfg_scale={cfg_scale} needs uncond_prompts (the rows without the condition); "
                         f"pass them, or leave cfg_scale at 1.0")
    if grammar is not None and pad_id not in (None, grammar.pad_id):
        raise ValueError(f"pad_id={pad_id} but the grammar's <|pad|> is {grammar.pad_id}; left padding "
                         f"must be <|pad|> so the grammar skips it: pass pad_id=None")
    if pad_id is None:
        pad_id = grammar.pad_id if grammar is not None else 0
    param = next(model.parameters())
    device = param.device
    sampler = _Sampler(sampling if sampling is not None else SamplingConfig(), cfg_scale,
                       tuple(grammar.modalities) if grammar is not None else (), grammar is not None,
                       device, seed)

    # 1. prefill: all rows left-padded to one length, cache sized for the whole run
    ids, n_pad = left_pad([*prompts, *(uncond_prompts or [])], pad_id, device)
    R, L = ids.shape
    if L + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt of {L} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"max_seq_len {model.config.max_seq_len}; shorten one of them")
    cache = KVCache(model.config, R, L + max_new_tokens, device=device, dtype=param.dtype)
    arange = torch.arange(L, device=device)
    cache.key_valid[:, :L] = arange >= n_pad[:, None]
    cache.padded = bool(n_pad.any())
    positions = (arange - n_pad[:, None]).clamp_min(0) if cache.padded else None  # (R, L)
    logits = model(ids, positions=positions, kv_cache=cache, last_only=True)[:, 0].float()  # (R, V)
    next_pos = (L - n_pad)[:, None].clone()  # (R, 1) position of the next token per row
    state = grammar.start(B, prefix=ids[:B]) if grammar is not None else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_ids = torch.empty(R, 1, dtype=torch.long, device=device)

    # 2. decode
    forward = _compiled_decode_step() if compile else _decode_step
    for step in range(max_new_tokens):
        row_kind = state.modality if state is not None else None
        if guided:
            logits = sampler.guide(logits, row_kind)  # (B, V)
        if grammar is not None:
            logits = grammar.apply(logits, state)
        tokens = sampler.sample(logits, row_kind)  # (B,)
        if eos_id is not None:
            tokens = tokens.masked_fill_(done, pad_id)
        if grammar is not None:
            grammar.advance(state, tokens, check=False)  # sampled from masked logits: no sync
        yield tokens
        if eos_id is not None:
            done |= tokens == eos_id
            if bool(done.all()):  # the one host sync per step
                return
        if step == max_new_tokens - 1:
            return
        step_ids[:B, 0] = tokens
        if guided:
            step_ids[B:, 0] = tokens
        logits = forward(model, step_ids, next_pos if cache.padded else None, cache)[:, 0].float()
        next_pos += 1


def _decode_step(model: TesseraLM, ids: Tensor, positions: Tensor | None, cache: KVCache) -> Tensor:
    """One decode step: ids (R, 1) → logits (R, 1, V), the cache advanced by one."""
    return model(ids, positions=positions, kv_cache=cache)


@functools.cache
def _compiled_decode_step() -> Callable[..., Tensor]:
    """:func:`_decode_step` through ``torch.compile``, made on first use. Dynamo keys its
    graphs on the model (one compile per model, up to ``torch._dynamo.config.cache_size_limit``)
    and takes the weights as inputs at every call, so a model trained or loaded in place
    after compiling decodes with its current weights."""
    return torch.compile(_decode_step, dynamic=True)


def generate(model: TesseraLM, prompts: Sequence[Tensor], *, max_new_tokens: int,
             sampling: SamplingConfig | Mapping[str, SamplingConfig] | None = None,
             grammar: GrammarLike | None = None, cfg_scale: float | Mapping[str, float] = 1.0,
             uncond_prompts: Sequence[Tensor] | None = None, eos_id: int | None = None,
             pad_id: int | None = None, seed: int | None = None, compile: bool = False) -> list[Tensor]:
    """Generate for each prompt; returns the new tokens per prompt (1-D, ending with
    ``eos_id`` when the row stopped on it). ``sampling=None`` samples at temperature 1;
    ``compile``: see :func:`stream`."""
    steps = list(stream(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling, grammar=grammar,
                        cfg_scale=cfg_scale, uncond_prompts=uncond_prompts, eos_id=eos_id, pad_id=pad_id,
                        seed=seed, compile=compile))
    out = torch.stack(steps, dim=1)  # (B, steps)
    if eos_id is None:
        return list(out.unbind(0))
    results = []
    for row in out.unbind(0):
        hits = (row == eos_id).nonzero()
        results.append(row[: int(hits[0]) + 1] if hits.numel() else row)
    return results
