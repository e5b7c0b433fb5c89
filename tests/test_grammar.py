"""Decoding grammar (core/grammar.py): random walks that sample only allowed tokens are
always valid documents, `validate` and `mask` agree token for token, each layout kind's
rules (meta first, level order, forced and optional end), prompts, in-place logits
masking and every error message."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tessera.core.document import Document, MediaSegment
from tessera.core.grammar import Grammar, GrammarError
from tessera.core.spec import LayoutError, MetaField, ModalitySpec, TokenLayout
from tessera.core.vocab import UnifiedVocab

sys.path.insert(0, str(Path(__file__).parent))
from doubles import FixedDouble, GridDouble, VariableDouble  # noqa: E402

TEXT = 10  # text ids of the hand-built vocabularies


# ---- random vocabularies ---------------------------------------------------------------
@st.composite
def layouts(draw: st.DrawFn) -> TokenLayout:
    kind = draw(st.sampled_from(["fixed", "grid", "variable"]))
    levels = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    meta = []
    for i in range(draw(st.integers(1 if kind == "grid" else 0, 2))):
        low = draw(st.integers(0 if kind != "grid" else 1, 2))
        meta.append(MetaField(name=f"m{i}", low=low, high=low + draw(st.integers(0, 2))))
    steps = draw(st.integers(1, 4)) if kind == "fixed" else None
    parts: tuple[tuple[int, int, int], ...] = ()
    if kind == "fixed" and len(levels) == 1 and levels[0] >= 2 and steps >= 2 and draw(st.booleans()):
        split, cut = draw(st.integers(1, steps - 1)), draw(st.integers(1, levels[0] - 1))
        parts = ((split, 0, cut), (steps - split, cut, levels[0]))  # e.g. a keyframe, then motion codes
    return TokenLayout(
        kind=kind,
        levels=levels,
        steps=steps,
        max_steps=draw(st.integers(1, 4)) if kind == "variable" else None,
        meta=tuple(meta),
        parts=parts,
    )


@st.composite
def vocabs(draw: st.DrawFn) -> UnifiedVocab:
    specs = [
        ModalitySpec(
            name=f"mod{i}",
            version="1",
            media_kind="timeseries",
            layout=draw(layouts()),
            fingerprint=f"fp{i}",
            special_tokens=draw(st.sampled_from([(), (f"<|mod{i}_extra|>",)])),
        )
        for i in range(draw(st.integers(1, 3)))
    ]
    return UnifiedVocab.build(draw(st.integers(1, 12)), specs)


def walk(g: Grammar, batch: int, length: int, seed: int) -> list[list[int]]:
    """Sample uniformly among allowed tokens; after ``length`` tokens close open spans
    (taking the end token as soon as it is allowed) and end with <|eos|>."""
    gen = torch.Generator().manual_seed(seed)
    vocab = g.vocab
    begin_of = {vocab.begin_id(n): i for i, n in enumerate(g.modalities)}
    end_ids = {vocab.end_id(n) for n in g.modalities}
    state, inside = g.start(batch), [-1] * batch
    seqs: list[list[int]] = [[] for _ in range(batch)]
    for step in range(length + max(s.layout.max_span_tokens for s in map(vocab.spec, g.modalities)) + 2):
        assert state.modality.tolist() == inside  # the state knows which span each row is in
        mask = g.mask(state)
        if step >= length:  # take an end token, <|eos|> or <|pad|> whenever one is allowed
            closers = torch.zeros_like(mask)
            closers[:, [*end_ids, vocab.eos_id, vocab.pad_id]] = True
            mask = torch.where((mask & closers).any(1, keepdim=True), mask & closers, mask)
        tokens = torch.multinomial(mask.float(), 1, generator=gen)[:, 0]
        g.advance(state, tokens)
        for r, t in enumerate(tokens.tolist()):
            seqs[r].append(t)
            inside[r] = begin_of.get(t, -1 if t in end_ids else inside[r])
        if bool(state.done.all()):
            break
    assert bool(state.done.all())
    return seqs


@settings(max_examples=25, deadline=None)
@given(vocab=vocabs(), seed=st.integers(0, 2**16))
def test_random_walk_is_valid_decodable_and_a_document(vocab: UnifiedVocab, seed: int) -> None:
    g = Grammar.from_manifest(vocab.manifest())
    for seq in walk(g, batch=3, length=30, seed=seed):
        assert g.validate(seq) is None
        for span in g.spans(seq):
            local = vocab.to_local(span.modality, torch.tensor(seq[span.begin + 1 : span.end]))
            vocab.spec(span.modality).layout.unflatten(local)  # raises if it does not fit
        doc = Document.from_ids(seq, vocab, _CharText(vocab.text_size))
        media = [s for s in doc if isinstance(s, MediaSegment)]
        assert [m.modality for m in media] == [s.modality for s in g.spans(seq)]


@settings(max_examples=25, deadline=None)
@given(vocab=vocabs(), seed=st.integers(0, 2**16), where=st.floats(0, 1))
def test_validate_and_mask_agree_on_every_token(vocab: UnifiedVocab, seed: int, where: float) -> None:
    g = Grammar.from_manifest(vocab.manifest())
    seq = walk(g, batch=1, length=20, seed=seed)[0]
    p = int(where * (len(seq) - 1))
    state = g.start(1, prefix=torch.tensor([seq[:p]], dtype=torch.long))
    allowed = g.mask(state)[0]
    for x in range(vocab.size):
        v = g.validate(seq[:p] + [x], partial=True)
        assert (v is None) == bool(allowed[x]), (p, x, v)
        if v is not None:  # a corrupted token is reported at its own position
            assert (v.position, v.token) == (p, x)
            assert g.validate(seq[:p] + [x] + seq[p + 1 :]).position == p


class _CharText:
    """Text double: id i <-> chr(97 + i)."""

    def __init__(self, size: int) -> None:
        self.vocab_size = size

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 97 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i) for i in ids)


# ---- the three layout kinds on the test doubles ------------------------------------------
@pytest.fixture(scope="module")
def vocab() -> UnifiedVocab:
    return UnifiedVocab.build(TEXT, [c.debug().spec for c in (FixedDouble, GridDouble, VariableDouble)])


@pytest.fixture(scope="module")
def g(vocab: UnifiedVocab) -> Grammar:
    return Grammar.from_manifest(vocab.manifest())


def allowed(g: Grammar, prefix: list[int]) -> set[int]:
    state = g.start(1, prefix=torch.tensor([prefix], dtype=torch.long))
    return set(g.mask(state)[0].nonzero().flatten().tolist())


def ids_of(vocab: UnifiedVocab, name: str, lo: int, hi: int) -> set[int]:
    start, _ = vocab.local_range(name)
    return set(range(start + lo, start + hi))


def test_outside_spans_text_roles_begins_eos_and_bos_only_first(vocab: UnifiedVocab, g: Grammar) -> None:
    outside = set(range(TEXT)) | set(vocab.role_ids.values()) | {vocab.eos_id}
    outside |= {vocab.begin_id(n) for n in vocab.modalities}
    assert allowed(g, []) == outside | {vocab.bos_id}
    assert allowed(g, [vocab.bos_id, 3]) == outside  # no second bos, never pad
    assert allowed(g, [vocab.bos_id, 3, vocab.eos_id]) == {vocab.pad_id}
    assert allowed(g, [vocab.bos_id, vocab.eos_id, vocab.pad_id]) == {vocab.pad_id}


def test_fixed_span_has_exactly_its_steps_then_forced_end(vocab: UnifiedVocab, g: Grammar) -> None:
    n = "double_fixed"
    codes = ids_of(vocab, n, 0, 32)
    prefix = [vocab.begin_id(n)]
    for _ in range(16):
        assert allowed(g, prefix) == codes
        prefix.append(min(codes))
    assert allowed(g, prefix) == {vocab.end_id(n)}
    assert g.validate(prefix + [vocab.end_id(n)]) is None


def test_grid_meta_first_and_product_of_meta_gives_steps(vocab: UnifiedVocab, g: Grammar) -> None:
    n = "double_grid"  # meta: height 1..4 (local 0..3), width 1..4 (local 4..7), then 16 grey levels
    begin, end = vocab.begin_id(n), vocab.end_id(n)
    start, _ = vocab.local_range(n)
    assert allowed(g, [begin]) == ids_of(vocab, n, 0, 4)
    assert allowed(g, [begin, start + 1]) == ids_of(vocab, n, 4, 8)
    head = [begin, start + 1, start + 4 + 2]  # height 2, width 3: 6 steps
    body = [start + 8] * 6
    for i in range(6):
        assert allowed(g, head + body[:i]) == ids_of(vocab, n, 8, 24)
    assert allowed(g, head + body) == {end}
    assert g.validate(head + body + [end]) is None
    v = g.validate(head + body[:5] + [end])
    assert v.position == 8 and "level 0 code" in v.reason and "step 5" in v.reason


def test_variable_span_end_after_whole_steps_forced_at_max(vocab: UnifiedVocab, g: Grammar) -> None:
    n = "double_variable"  # 3 levels of 8 codes, 1..64 steps
    begin, end = vocab.begin_id(n), vocab.end_id(n)
    levels = [ids_of(vocab, n, 8 * lv, 8 * lv + 8) for lv in range(3)]
    step = [min(levels[0]), min(levels[1]), min(levels[2])]
    assert allowed(g, [begin]) == levels[0]  # at least one step
    assert allowed(g, [begin, *step[:1]]) == levels[1]  # level order within a step
    assert allowed(g, [begin, *step[:2]]) == levels[2]
    assert allowed(g, [begin, *step]) == levels[0] | {end}
    assert allowed(g, [begin, *step * 64]) == {end}
    v = g.validate([begin, *step[:2], end])
    assert v.position == 3 and "level 2 code" in v.reason
    v = g.validate([begin, step[1]])
    assert v.position == 1 and f"token {step[1]} (double_variable level 1 code 0" in v.reason


def test_prefix_may_end_inside_a_span_and_left_padding_is_skipped(vocab: UnifiedVocab, g: Grammar) -> None:
    pad, bos = vocab.pad_id, vocab.bos_id
    user = vocab.role_ids["user"]
    prompt = torch.tensor([[pad, pad, bos, user, 4, vocab.begin_id("double_grid")], [bos, user, 4, 5, 6, 7]])
    state = g.start(2, prefix=prompt)
    assert state.modality.tolist() == [vocab.modalities.index("double_grid"), -1]
    mask = g.mask(state)
    assert set(mask[0].nonzero().flatten().tolist()) == ids_of(vocab, "double_grid", 0, 4)
    assert not mask[1, bos] and mask[1, 3] and not bool(state.done.any())
    assert g.validate(prompt[0, 2:]) is not None and g.validate(prompt[0, 2:], partial=True) is None


def test_apply_masks_logits_in_place_including_padded_columns(vocab: UnifiedVocab, g: Grammar) -> None:
    state = g.start(2, prefix=torch.tensor([[vocab.begin_id("double_fixed")], [vocab.bos_id]]))
    logits = torch.randn(2, vocab.size + 5)
    before = logits.clone()
    out = g.apply(logits, state)
    assert out is logits
    allowed_mask = torch.cat([g.mask(state), torch.zeros(2, 5, dtype=torch.bool)], 1)
    assert torch.equal(logits[allowed_mask], before[allowed_mask])
    assert bool((logits[~allowed_mask] == float("-inf")).all())
    half = torch.randn(2, vocab.size, dtype=torch.bfloat16)
    assert torch.equal(g.apply(half.clone(), state).isfinite(), g.mask(state))
    with pytest.raises(ValueError, match=r"logits have shape \(2, 3\), expected \(batch=2, >= \d+\)"):
        g.apply(torch.zeros(2, 3), state)


def test_advance_names_row_token_and_expectation(vocab: UnifiedVocab, g: Grammar) -> None:
    state = g.start(2, prefix=torch.tensor([[vocab.bos_id], [vocab.begin_id("double_grid")]]))
    with pytest.raises(
        ValueError,
        match=r"row 1: token 3 \(text piece 3\) is not allowed; expected inside a double_grid span: its 'height' meta token",
    ) as e:
        g.advance(state, torch.tensor([3, 3]))
    assert "grammar.apply(logits, state)" in str(e.value)
    with pytest.raises(ValueError, match=r"row 0: token 999 is outside the vocabulary"):
        g.advance(state, torch.tensor([999, 3]))
    with pytest.raises(ValueError, match=r"tokens have shape \(3,\).*expected integer ids of shape \(2,\)"):
        g.advance(state, torch.tensor([1, 2, 3]))
    with pytest.raises(
        ValueError, match=r"row 0 prefix position 1: token \d+ \(special token <\|bos\|>\) is not allowed"
    ):
        g.start(1, prefix=torch.tensor([[vocab.bos_id, vocab.bos_id]]))
    with pytest.raises(ValueError, match=r"prefix has shape \(3,\), expected \(batch_size=1, T\)"):
        g.start(1, prefix=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="batch_size=0"):
        g.start(0)


def test_validate_reports_extra_tokens_eos_tail_unfinished_and_out_of_range(vocab: UnifiedVocab) -> None:
    spec = ModalitySpec(
        name="tagged",
        version="1",
        media_kind="timeseries",
        layout=TokenLayout(kind="fixed", levels=(4,), steps=1),
        fingerprint="x",
        special_tokens=("<|tagged_task|>",),
    )
    v2 = vocab.add_modality(spec)
    g = Grammar.from_manifest(v2.manifest())
    extra = v2.special_id("<|tagged_task|>")
    v = g.validate([v2.bos_id, extra])
    assert v.position == 1 and "<|tagged_task|>" in v.reason and "expected outside a span" in v.reason
    v = g.validate([1, v2.eos_id, v2.pad_id, 2])
    assert v.position == 3 and "expected after <|eos|>: only <|pad|>" in v.reason
    v = g.validate([1, v2.begin_id("tagged")])
    assert (
        v.position == 2 and v.token is None and "ends inside the tagged span begun at position 1" in v.reason
    )
    v = g.validate([1, v2.size])
    assert v.position == 1 and f"ids are [0, {v2.size})" in v.reason
    with pytest.raises(
        GrammarError,
        match=r"position 1: token 1 \(text piece 1\) is not allowed; expected inside a tagged span",
    ):
        g.spans([v2.begin_id("tagged"), 1])
    with pytest.raises(ValueError, match=r"validate one sequence of integer ids at a time"):
        g.validate(torch.zeros(2, 3, dtype=torch.long))


def test_from_manifest_refuses_a_tampered_manifest(vocab: UnifiedVocab) -> None:
    m = vocab.manifest()
    m["modalities"][0]["end_id"] += 1
    with pytest.raises(ValueError, match="hash"):
        Grammar.from_manifest(m)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_decoding_on_gpu_matches_cpu(vocab: UnifiedVocab) -> None:
    cpu, gpu = Grammar(vocab), Grammar(vocab).to("cuda")
    seq = walk(cpu, batch=4, length=40, seed=1)
    n = max(map(len, seq))
    ids = torch.tensor([s + [vocab.pad_id] * (n - len(s)) for s in seq])
    a, b = cpu.start(4), gpu.start(4)
    for t in range(n):
        logits = torch.randn(4, vocab.size, device="cuda")
        gpu.apply(logits, b)
        assert torch.equal(cpu.mask(a), gpu.mask(b).cpu()) and torch.equal(
            logits.isfinite().cpu(), cpu.mask(a)
        )
        cpu.advance(a, ids[:, t])
        gpu.advance(b, ids[:, t].cuda())


# ---- a fixed layout in parts (a keyframe's codes, then motion codes) -------------------
def test_parts_hold_each_step_to_its_own_codes() -> None:
    layout = TokenLayout(kind="fixed", levels=(6,), steps=3, parts=((2, 0, 4), (1, 4, 6)))
    spec = ModalitySpec(name="clip", version="1", media_kind="video", layout=layout, fingerprint="fp")
    vocab = UnifiedVocab.build(TEXT, [spec])
    g = Grammar.from_manifest(vocab.manifest())
    lo, _ = vocab.local_range("clip")
    begin = vocab.begin_id("clip")
    state = g.start(1, prefix=torch.tensor([[begin]]))
    for step, allowed_codes in enumerate(([0, 1, 2, 3], [0, 1, 2, 3], [4, 5])):
        allowed = g.mask(state)[0].nonzero().flatten().tolist()
        assert allowed == [lo + c for c in allowed_codes], step
        g.advance(state, torch.tensor([lo + allowed_codes[-1]]))
    assert g.mask(state)[0].nonzero().flatten().tolist() == [vocab.end_id("clip")]
    good = [begin, lo + 1, lo + 3, lo + 5, vocab.end_id("clip")]
    assert g.validate(good) is None and [s.modality for s in g.spans(good)] == ["clip"]
    bad = [begin, lo + 1, lo + 4, lo + 5, vocab.end_id("clip")]  # a part-1 code at step 1
    v = g.validate(bad)
    assert v.position == 2 and "a code of part 0 (steps 0..1" in v.reason and "(step 1 of the span" in v.reason
    # the layout checks the same rule, and a manifest round trip keeps it
    with pytest.raises(LayoutError, match=r"step 2 holds code 1, but it lies in part 1 \(steps 2..2\), which takes codes 4..5"):
        layout.flatten(torch.tensor([0, 3, 1]))
    with pytest.raises(LayoutError, match="step 0 holds code 5"):
        layout.unflatten(torch.tensor([5, 0, 4]))
    assert TokenLayout.from_dict(layout.to_dict()) == layout
    assert "parts" not in TokenLayout(kind="fixed", levels=(6,), steps=3).to_dict()  # old manifests keep their hash


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kind="variable", levels=(6,), max_steps=3, parts=((3, 0, 6),)), "need a 'fixed' layout of one level"),
        (dict(kind="fixed", levels=(6, 2), steps=3, parts=((3, 0, 6),)), "need a 'fixed' layout of one level"),
        (dict(kind="fixed", levels=(6,), steps=3, parts=((2, 0, 4), (2, 4, 6))), "cover 4 steps"),
        (dict(kind="fixed", levels=(6,), steps=3, parts=((3, 4, 7),)), r"0 <= low < high <= 6"),
        (dict(kind="fixed", levels=(6,), steps=3, parts=((3, 4, 4),)), r"0 <= low < high <= 6"),
    ],
)
def test_bad_parts_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TokenLayout(**kwargs)
