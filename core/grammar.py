"""The decoding grammar of Tessera documents: which token may come next.

A document in the unified vocabulary (:mod:`tessera.core.vocab`) is::

    document := <|bos|>? item* (<|eos|> <|pad|>*)?
    item     := text id | <|system|> | <|user|> | <|assistant|> | span
    span     := <|begin_M|> meta_0 .. meta_{k-1} step * n <|end_M|>
    step     := level-0 code, level-1 code, ..., level-(L-1) code

where the meta tokens and levels come from modality ``M``'s :class:`~tessera.core.spec.TokenLayout`
and ``n`` is ``layout.steps`` ("fixed"), the product of the meta values ("grid") or any
number in ``1..max_steps`` ("variable"; the end token may follow every complete step
and is forced at ``max_steps``). A fixed layout with ``parts`` holds each step to its
part's range of codes (one slot per part). Every span the grammar lets through unflattens with
its layout, so a constrained LLM only writes decodable media.

:class:`Grammar` is a batched finite-state machine for constrained decoding, built
from the vocabulary manifest alone (no plugin is loaded). Each state falls in one of
a few *slots* (start, text, after eos, and per modality: one per meta field, one per
code level, "level 0 or end", "end"), and each slot's allowed tokens are one
precomputed row of a ``(slots, V)`` boolean table. ``mask`` is therefore one row
gather per sequence, ``apply`` one gather of a 0/-inf bias table and one add, and
``advance`` seven small ops on ``(B,)`` tensors (see :class:`Grammar`); nothing
loops over the vocabulary or the batch.
:meth:`Grammar.validate` checks a whole sequence span by span (vectorised within a
span) and reports the first position that breaks the grammar and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .vocab import UnifiedVocab

__all__ = ["Grammar", "GrammarState", "GrammarViolation", "GrammarError", "Span"]

# Slots shared by every grammar; each modality's slots follow.
_START, _TEXT, _DONE = 0, 1, 2
_FIXED, _GRID, _VARIABLE = 0, 1, 2
_KIND_CODES = {"fixed": _FIXED, "grid": _GRID, "variable": _VARIABLE}


@dataclass(frozen=True)
class GrammarViolation:
    """The first place a sequence breaks the grammar. ``token`` is ``None`` when the
    sequence ends too early (inside a span) and ``position`` is then its length."""

    position: int
    token: int | None
    reason: str

    def __str__(self) -> str:
        return f"position {self.position}: {self.reason}"


class GrammarError(ValueError):
    """A sequence that breaks the grammar; ``.violation`` says where and why."""

    def __init__(self, violation: GrammarViolation) -> None:
        super().__init__(str(violation))
        self.violation = violation


@dataclass(frozen=True)
class Span:
    """One media span of a valid sequence: ``ids[begin]`` is ``<|begin_M|>``,
    ``ids[end]`` is ``<|end_M|>``, the local ids lie strictly between."""

    modality: str
    begin: int
    end: int


@dataclass
class GrammarState:
    """Where each of ``B`` sequences stands. All fields are ``(B,)`` tensors on the
    grammar's device; :meth:`Grammar.advance` replaces them."""

    pc: Tensor  # long: position in the grammar's program (which slot comes after which)
    steps: Tensor  # long: steps the open span needs (its maximum for "variable")
    slot: Tensor  # long: row of the allowed-token table for the next token
    modality: Tensor  # long: index into grammar.modalities of the open span, -1 outside

    @property
    def done(self) -> Tensor:
        """``(B,)`` bool: ``<|eos|>`` was written."""
        return self.pc == _DONE

    @property
    def batch_size(self) -> int:
        return self.slot.shape[0]

    def clone(self) -> GrammarState:
        return GrammarState(
            pc=self.pc.clone(),
            steps=self.steps.clone(),
            slot=self.slot.clone(),
            modality=self.modality.clone(),
        )


@dataclass(frozen=True)
class _Modality:
    """One modality's layout in global ids and grammar slots."""

    name: str
    index: int
    kind: int
    base: int  # its first slot
    pc: int  # its first program position (right after <|begin_NAME|>)
    end_id: int
    meta: tuple[tuple[int, int, int], ...]  # per field: (first global id, size, low value)
    level_lo: Tensor  # (L,) first global id of each level's codes
    level_hi: Tensor  # (L,) one past the last
    steps: int  # fixed: steps; grid: 1 (times each meta value); variable: max_steps
    max_steps: int  # the most steps a span can hold
    step_slot: Tensor | None = None  # a fixed layout's parts: (steps,) slot of each step
    step_lo: Tensor | None = None  # (steps,) first global id its part allows
    step_hi: Tensor | None = None  # (steps,) one past the last

    @property
    def num_levels(self) -> int:
        return self.level_lo.numel()

    @property
    def end_slot(self) -> int:
        return self.base + len(self.meta) + self.num_levels

    @property
    def level0_or_end_slot(self) -> int:
        return self.end_slot + 1


# Columns of the program table (one row per program position) and the token table.
_SLOT, _END_SLOT, _CODE_START, _STRIDE, _MOD = range(5)
_NEXT, _INC, _FACTOR, _INIT = range(4)


class Grammar:
    """Batched grammar over a unified vocabulary; build with :meth:`from_manifest`.

    >>> g = Grammar.from_manifest(vocab.manifest())
    >>> state = g.start(batch_size=8, prefix=prompt_ids)       # (8, T) prompt, may end inside a span
    >>> logits = g.apply(model(...)[:, -1], state)              # disallowed -> -inf, in place
    >>> g.advance(state, torch.multinomial(logits.softmax(-1), 1)[:, 0])

    Decoding state is a *program counter*: positions 0, 1, 2 are "start", "text" and
    "after eos"; each modality owns the positions ``k = 0 .. meta + max_steps * L``
    of a span (``k`` tokens written after its begin token). A token either jumps
    (text, begin, end, eos: the token table says where) or steps to ``pc + 1``
    (meta and codes). The program table gives each position its slot; a grid's span
    is cut short by forcing the end token once ``steps`` (the product of its meta
    values) steps are written.
    """

    def __init__(self, vocab: UnifiedVocab) -> None:
        self.vocab = vocab
        self.modalities: tuple[str, ...] = vocab.modalities
        self.vocab_size = V = vocab.size
        self.bos_id, self.eos_id, self.pad_id = vocab.bos_id, vocab.eos_id, vocab.pad_id
        begins = [vocab.begin_id(n) for n in self.modalities]

        outside = torch.zeros(V, dtype=torch.bool)
        outside[: vocab.text_size] = True
        outside[list(vocab.role_ids.values()) + begins + [self.eos_id]] = True
        rows = [outside.clone(), outside, torch.zeros(V, dtype=torch.bool)]
        rows[_START][self.bos_id] = True
        rows[_DONE][self.pad_id] = True
        role_names = " ".join(f"<|{r}|>" for r in vocab.role_ids)
        begin_names = " ".join(f"<|begin_{n}|>" for n in self.modalities) or "none: no modality"
        outside_desc = f"text, a role token ({role_names}), a begin token ({begin_names}) or <|eos|>"
        self._slot_desc = [
            f"expected at the start: <|bos|>, {outside_desc}",
            f"expected outside a span: {outside_desc}",
            "expected after <|eos|>: only <|pad|>",
        ]
        # token table: pc = next + inc * pc (text, begin, end, eos jump: inc 0; meta and codes
        # step on: next 1, inc 1) and steps = init + factor * steps (a begin token resets it,
        # a grid meta token multiplies it by its value)
        tokens = torch.zeros(V, 4, dtype=torch.long)
        tokens[:, _NEXT], tokens[:, _FACTOR] = _TEXT, 1
        tokens[[self.eos_id, self.pad_id], _NEXT] = _DONE
        program = [torch.tensor([[s, s, -1, 0, -1] for s in (_START, _TEXT, _DONE)])]
        n_pc = 3

        self._mods: list[_Modality] = []
        for i, name in enumerate(self.modalities):
            layout = vocab.spec(name).layout
            start, stop = vocab.local_range(name)
            end_id = vocab.end_id(name)
            base = len(rows)
            meta = tuple(
                (start + off, f.size, f.low) for f, off in zip(layout.meta, layout.meta_offsets, strict=True)
            )
            for f, (first, size, _) in zip(layout.meta, meta, strict=True):
                rows.append(self._row(V, first, first + size))
                self._slot_desc.append(
                    f"expected inside a {name} span: its {f.name!r} meta token "
                    f"(ids [{first}, {first + size}) = values {f.low}..{f.high})"
                )
            lo = [start + off for off in layout.level_offsets]
            hi = [a + k for a, k in zip(lo, layout.levels, strict=True)]
            for lv, (a, b) in enumerate(zip(lo, hi, strict=True)):
                rows.append(self._row(V, a, b))
                self._slot_desc.append(f"expected inside a {name} span: a level {lv} code (ids [{a}, {b}))")
            rows.append(self._row(V, end_id, end_id + 1))
            self._slot_desc.append(
                f"expected inside a {name} span: <|end_{name}|> (id {end_id}), the span is complete"
            )
            if layout.kind == "variable":
                rows.append(self._row(V, lo[0], hi[0]) | rows[-1])
                self._slot_desc.append(
                    f"expected inside a {name} span: a level 0 code (ids [{lo[0]}, {hi[0]})) "
                    f"or <|end_{name}|> (id {end_id})"
                )
            step_slot = step_lo = step_hi = None
            ranges = layout.step_code_ranges()
            if ranges is not None:  # one slot per part: its own range of level-0 codes
                first_slot, first_step = len(rows), 0
                for j, (n, a, b) in enumerate(layout.parts):
                    rows.append(self._row(V, lo[0] + a, lo[0] + b))
                    self._slot_desc.append(
                        f"expected inside a {name} span: a code of part {j} (steps {first_step}.."
                        f"{first_step + n - 1}: ids [{lo[0] + a}, {lo[0] + b}))"
                    )
                    first_step += n
                step_slot = first_slot + torch.repeat_interleave(
                    torch.arange(len(layout.parts)), torch.tensor([n for n, _, _ in layout.parts])
                )
                step_lo, step_hi = lo[0] + ranges[0], lo[0] + ranges[1]
            steps = {"fixed": layout.steps, "grid": 1, "variable": layout.max_steps}[layout.kind]
            mod = _Modality(
                name=name,
                index=i,
                kind=_KIND_CODES[layout.kind],
                base=base,
                pc=n_pc,
                end_id=end_id,
                meta=meta,
                level_lo=torch.tensor(lo),
                level_hi=torch.tensor(hi),
                steps=int(steps),
                max_steps=(layout.max_span_tokens - len(meta)) // layout.num_levels,
                step_slot=step_slot,
                step_lo=step_lo,
                step_hi=step_hi,
            )
            self._mods.append(mod)
            program.append(self._span_program(mod))
            n_pc += program[-1].shape[0]
            tokens[begins[i]] = torch.tensor([mod.pc, 0, 0, mod.steps])
            tokens[start:stop, _NEXT], tokens[start:stop, _INC] = 1, 1
            if mod.kind == _GRID:
                for first, size, low in meta:
                    tokens[first : first + size, _FACTOR] = torch.arange(low, low + size)

        self._allowed = torch.stack(rows)  # (S, V)
        self._program = torch.cat(program)  # (P, 5)
        self._tokens = tokens  # (V, 4)
        self._bias: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        # validate() runs on the CPU whatever the decoding device
        self._text_row_cpu = self._allowed[_TEXT].clone()
        self._begin_of_cpu = torch.full((V,), -1, dtype=torch.long)
        self._begin_of_cpu[begins] = torch.arange(len(begins))

    @staticmethod
    def _row(V: int, a: int, b: int) -> Tensor:
        row = torch.zeros(V, dtype=torch.bool)
        row[a:b] = True
        return row

    @staticmethod
    def _span_program(mod: _Modality) -> Tensor:
        """Program rows for ``k = 0 .. meta + max_steps * L`` tokens written into a span."""
        n_meta, L = len(mod.meta), mod.num_levels
        k = torch.arange(n_meta + mod.max_steps * L + 1)
        c = (k - n_meta).clamp(min=0)
        step, level = c // L, c % L
        slot = mod.base + torch.where(k < n_meta, k, n_meta + level)
        if mod.step_slot is not None:  # parts (one level): each step's own range of codes
            in_steps = (k >= n_meta) & (step < mod.max_steps)
            slot = torch.where(in_steps, mod.step_slot[step.clamp(max=mod.max_steps - 1)], slot)
        boundary = (k >= n_meta) & (level == 0)
        if mod.kind == _VARIABLE:
            slot = torch.where(boundary & (step >= 1), mod.level0_or_end_slot, slot)
        slot = torch.where(boundary & (step == mod.max_steps), mod.end_slot, slot)
        rows = torch.empty(k.numel(), 5, dtype=torch.long)
        rows[:, _SLOT], rows[:, _END_SLOT] = slot, mod.end_slot
        rows[:, _CODE_START], rows[:, _STRIDE], rows[:, _MOD] = mod.pc + n_meta, L, mod.index
        return rows

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Grammar:
        """The grammar of the vocabulary ``manifest`` describes (checked against its hash)."""
        return cls(UnifiedVocab.from_manifest(manifest))

    # ---- device ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._allowed.device

    def to(self, device: str | torch.device) -> Grammar:
        """Move the decoding tables to ``device`` (in place; returns ``self``)."""
        self._allowed = self._allowed.to(device)
        self._program = self._program.to(device)
        self._tokens = self._tokens.to(device)
        self._bias.clear()
        return self

    # ---- decoding ----------------------------------------------------------------
    def start(self, batch_size: int, prefix: Tensor | None = None) -> GrammarState:
        """A state for ``batch_size`` new sequences, advanced through ``prefix``
        ``(B, T)`` prompt ids if given. ``<|pad|>`` in the prefix is skipped (left
        padding of prompts of different lengths)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: give the number of sequences, an int >= 1")
        zeros = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        state = GrammarState(pc=zeros + _START, steps=zeros.clone(), slot=zeros + _START, modality=zeros - 1)
        if prefix is None:
            return state
        prefix = torch.as_tensor(prefix, device=self.device)
        if prefix.ndim != 2 or prefix.shape[0] != batch_size:
            raise ValueError(
                f"prefix has shape {tuple(prefix.shape)}, expected (batch_size={batch_size}, T); "
                f"pad prompts of different lengths on the left with <|pad|> (id {self.pad_id})"
            )
        if prefix.is_floating_point() or prefix.dtype == torch.bool:
            raise ValueError(f"prefix must hold integer token ids, got dtype {prefix.dtype}")
        for t in range(prefix.shape[1]):
            col = prefix[:, t].long()
            self._check(state, col, where=f"prefix position {t}")
            new = self._transition(state, col)
            keep = col == self.pad_id
            for name in ("pc", "steps", "slot", "modality"):
                setattr(state, name, torch.where(keep, getattr(state, name), getattr(new, name)))
        return state

    def mask(self, state: GrammarState) -> Tensor:
        """``(B, V)`` booleans: True where a token may come next."""
        return self._allowed.index_select(0, state.slot)

    def apply(self, logits: Tensor, state: GrammarState) -> Tensor:
        """Set disallowed tokens of ``logits`` ``(B, V')`` to ``-inf`` in place and return
        it. ``V'`` may exceed the vocabulary (an LLM's padded embedding): the extra
        columns are disallowed too. Logits must be finite (``+inf`` would become NaN)."""
        B, V = state.batch_size, self.vocab_size
        if logits.ndim != 2 or logits.shape[0] != B or logits.shape[1] < V:
            raise ValueError(
                f"logits have shape {tuple(logits.shape)}, expected (batch={B}, >= {V}) for this "
                f"grammar's vocabulary; pass the last position's logits, logits[:, -1]"
            )
        key = (logits.dtype, logits.device)
        if key not in self._bias:  # 0 where allowed, -inf where not: an add is cheaper than masked_fill
            bias = torch.zeros(self._allowed.shape, dtype=logits.dtype, device=self.device)
            self._bias[key] = bias.masked_fill_(~self._allowed, float("-inf")).to(logits.device)
        bias = self._bias[key].index_select(0, state.slot.to(logits.device))
        if logits.shape[1] == V:
            return logits.add_(bias)
        logits[:, :V].add_(bias)
        logits[:, V:] = float("-inf")
        return logits

    def advance(self, state: GrammarState, tokens: Tensor, *, check: bool = True) -> None:
        """Move every row past its chosen token ``tokens`` ``(B,)``. A token the grammar
        does not allow raises ``ValueError`` naming the row, the token and what was
        expected (``check=False`` skips that test and its device sync)."""
        tokens = torch.as_tensor(tokens, device=state.slot.device)
        if tokens.shape != (state.batch_size,) or tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise ValueError(
                f"tokens have shape {tuple(tokens.shape)} and dtype {tokens.dtype}, expected integer "
                f"ids of shape ({state.batch_size},), one per row"
            )
        tokens = tokens.long()
        if check:
            self._check(state, tokens)
        new = self._transition(state, tokens)
        state.pc, state.steps, state.slot, state.modality = new.pc, new.steps, new.slot, new.modality

    def _check(self, state: GrammarState, tokens: Tensor, where: str = "") -> None:
        V = self.vocab_size
        ok = (tokens >= 0) & (tokens < V)
        ok &= self._allowed[state.slot, tokens.clamp(0, V - 1)]
        if where:  # prompt padding is skipped, not checked
            ok |= tokens == self.pad_id
        if bool(ok.all()):
            return
        row = int((~ok).nonzero()[0])
        slot, tok = int(state.slot[row]), int(tokens[row])
        context = self._context(int(state.modality[row]), int(state.pc[row]), int(state.steps[row]))
        raise ValueError(
            f"row {row}{' ' + where if where else ''}: {self._describe(tok)} is not allowed; "
            f"{self._slot_desc[slot]}{context}. Sample from grammar.apply(logits, state) or "
            f"grammar.mask(state)"
        )

    def _transition(self, state: GrammarState, tokens: Tensor) -> GrammarState:
        """The state after ``tokens``: seven small kernels, whatever B and V."""
        tok = self._tokens.index_select(0, tokens)  # (B, 4)
        pc = torch.addcmul(tok[:, _NEXT], tok[:, _INC], state.pc)
        steps = torch.addcmul(tok[:, _INIT], state.steps, tok[:, _FACTOR])
        row = self._program.index_select(0, pc)  # (B, 5)
        forced_end = pc == torch.addcmul(row[:, _CODE_START], row[:, _STRIDE], steps)  # never outside a span
        return GrammarState(
            pc=pc,
            steps=steps,
            slot=torch.where(forced_end, row[:, _END_SLOT], row[:, _SLOT]),
            modality=row[:, _MOD],
        )

    # ---- whole sequences ---------------------------------------------------------
    def validate(self, ids: Tensor | Sequence[int], *, partial: bool = False) -> GrammarViolation | None:
        """The first position where ``ids`` (one sequence) breaks the grammar, or
        ``None``. With ``partial=True`` a sequence may end inside a span (a prompt)."""
        return self._scan(ids, partial)[1]

    def spans(self, ids: Tensor | Sequence[int]) -> list[Span]:
        """The media spans of a complete sequence; raises :class:`GrammarError` (a
        ``ValueError``) at the first violation."""
        spans, violation = self._scan(ids, partial=False)
        if violation is not None:
            raise GrammarError(violation)
        return spans

    def _scan(self, ids: Tensor | Sequence[int], partial: bool) -> tuple[list[Span], GrammarViolation | None]:
        t = torch.as_tensor(ids).cpu()
        if t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(
                f"ids have shape {tuple(t.shape)} and dtype {t.dtype}; validate one sequence of "
                f"integer ids at a time (shape (T,))"
            )
        t = t.long()
        T, V = t.numel(), self.vocab_size
        spans: list[Span] = []
        outside = (t < 0) | (t >= V)
        if outside.any():
            p = int(outside.nonzero()[0])
            return spans, GrammarViolation(p, int(t[p]), f"{self._describe(int(t[p]))}; ids are [0, {V})")
        allowed_text = self._text_row_cpu[t]
        begins = (self._begin_of_cpu[t] >= 0).nonzero().flatten().tolist()
        pos, bi = 0, 0
        while True:
            while bi < len(begins) and begins[bi] < pos:
                bi += 1
            b = begins[bi] if bi < len(begins) else T
            violation, finished = self._scan_text(t, allowed_text, pos, b)
            if violation is not None or finished or b == T:
                return spans, violation
            span, violation = self._scan_span(t, b, partial)
            if span is None:
                return spans, violation
            spans.append(span)
            pos = span.end + 1

    def _scan_text(self, t: Tensor, ok: Tensor, a: int, b: int) -> tuple[GrammarViolation | None, bool]:
        """Check ids ``[a, b)`` outside any span; ``finished`` once ``<|eos|>`` closed the sequence."""
        region_ok = ok[a:b].clone()
        if a == 0 and b > 0 and int(t[0]) == self.bos_id:
            region_ok[0] = True
        bad = (~region_ok).nonzero().flatten()
        eos = (t[a:b] == self.eos_id).nonzero().flatten()
        if eos.numel() and (not bad.numel() or eos[0] < bad[0]):
            e = a + int(eos[0])
            tail = (t[e + 1 :] != self.pad_id).nonzero().flatten()
            if tail.numel():
                p = e + 1 + int(tail[0])
                return self._violation(t, p, _DONE), True
            return None, True
        if bad.numel():
            p = a + int(bad[0])
            return self._violation(t, p, _START if p == 0 else _TEXT), False
        return None, False

    def _scan_span(self, t: Tensor, b: int, partial: bool) -> tuple[Span | None, GrammarViolation | None]:
        """Check the span opened at ``b``: its meta tokens, its codes in level order, its end."""
        T = t.numel()
        mod = self._mods[int(self._begin_of_cpu[t[b]])]
        total, p = mod.steps, b + 1
        for j, (first, size, low) in enumerate(mod.meta):
            if p >= T:
                return None, self._unfinished(mod, b, T, partial)
            v = int(t[p])
            if not first <= v < first + size:
                return None, self._violation(t, p, mod.base + j)
            if mod.kind == _GRID:
                total *= v - first + low
            p += 1
        L = mod.num_levels
        n = total * L
        window = t[p : p + n]
        level = torch.arange(window.numel()) % L
        if mod.step_lo is not None:  # parts: one level, each step in its part's range
            step_lo, step_hi = mod.step_lo[: window.numel()], mod.step_hi[: window.numel()]
            bad = ((window < step_lo) | (window >= step_hi)).nonzero().flatten()
        else:
            bad = ((window < mod.level_lo[level]) | (window >= mod.level_hi[level])).nonzero().flatten()
        if bad.numel():
            q = int(bad[0])
            at_boundary = q % L == 0 and q >= L
            if mod.kind == _VARIABLE and at_boundary and int(t[p + q]) == mod.end_id:
                return Span(mod.name, b, p + q), None
            slot = (
                mod.level0_or_end_slot
                if mod.kind == _VARIABLE and at_boundary
                else int(mod.step_slot[q]) if mod.step_slot is not None
                else mod.base + len(mod.meta) + q % L
            )
            return None, self._violation(t, p + q, slot, f" (step {q // L} of the span begun at {b})")
        e = p + n
        if e >= T:
            return None, self._unfinished(mod, b, T, partial)
        if int(t[e]) != mod.end_id:
            return None, self._violation(t, e, mod.end_slot, f" after {total} steps")
        return Span(mod.name, b, e), None

    def _unfinished(self, mod: _Modality, b: int, T: int, partial: bool) -> GrammarViolation | None:
        if partial:
            return None
        return GrammarViolation(
            T,
            None,
            f"the sequence ends inside the {mod.name} span begun at position {b}; finish the span "
            f"and close it with <|end_{mod.name}|>, or validate a prompt with partial=True",
        )

    def _violation(self, t: Tensor, p: int, slot: int, context: str = "") -> GrammarViolation:
        tok = int(t[p])
        return GrammarViolation(
            p, tok, f"{self._describe(tok)} is not allowed; {self._slot_desc[slot]}{context}"
        )

    # ---- messages ----------------------------------------------------------------
    def _describe(self, token: int) -> str:
        if 0 <= token < self.vocab_size:
            what = self.vocab.explain(token).split(": ", 1)[-1]  # "id 5: text piece 5" -> "text piece 5"
            return f"token {token} ({what})"
        return f"token {token} is outside the vocabulary"

    def _context(self, modality: int, pc: int, steps: int) -> str:
        if modality < 0:
            return ""
        mod = self._mods[modality]
        k = pc - mod.pc
        if k < len(mod.meta):
            return f" ({k} tokens into the span)"
        written = (k - len(mod.meta)) // mod.num_levels
        need = f"at most {steps}" if mod.kind == _VARIABLE else f"{steps}"
        return f" ({written} of {need} steps written)"

    def __repr__(self) -> str:
        return (
            f"Grammar(vocab_size={self.vocab_size}, modalities={list(self.modalities)}, "
            f"slots={self._allowed.shape[0]})"
        )
