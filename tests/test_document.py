"""Interleaved documents (core/document.py): random documents over random layouts survive
to_ids -> from_ids, real files go through the plugins end to end, loss masks train the
right tokens, both JSON shapes read and write, and every malformed input is named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tessera.core.document import Document, MediaSegment, TextSegment
from tessera.core.grammar import Grammar
from tessera.core.text import TextTokenizer
from tessera.core.vocab import UnifiedVocab

sys.path.insert(0, str(Path(__file__).parent))
from doubles import FixedDouble, GridDouble, VariableDouble  # noqa: E402
from test_grammar import vocabs  # noqa: E402

WORDS = "a red circle on the left blue square moves up says hello".split()


@pytest.fixture(scope="module")
def text() -> TextTokenizer:
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(6)) for i in range(200)]
    return TextTokenizer.train(corpus, vocab_size=300)


@pytest.fixture(scope="module")
def plugins() -> dict[str, object]:
    return {c.name: c.debug() for c in (FixedDouble, GridDouble, VariableDouble)}


@pytest.fixture(scope="module")
def vocab(text: TextTokenizer, plugins: dict[str, object]) -> UnifiedVocab:
    return UnifiedVocab.build(text.vocab_size, [p.spec for p in plugins.values()])


# ---- round trip over random layouts ---------------------------------------------------
def random_local_ids(vocab: UnifiedVocab, name: str, seed: int) -> torch.Tensor:
    layout = vocab.spec(name).layout
    g = torch.Generator().manual_seed(seed)
    meta = {m.name: int(torch.randint(m.low, m.high + 1, (1,), generator=g)) for m in layout.meta}
    steps = layout.steps_for(meta)
    if steps is None:
        steps = int(torch.randint(1, layout.max_steps + 1, (1,), generator=g))
    codes = torch.stack([torch.randint(0, k, (steps,), generator=g) for k in layout.levels], 1)
    ranges = layout.step_code_ranges()
    if ranges is not None:  # parts: each step draws from its own part's codes
        low, high = ranges
        codes = low[:, None] + (torch.rand(steps, 1, generator=g) * (high - low)[:, None]).long()
    return layout.flatten(codes, meta)


@st.composite
def documents(draw: st.DrawFn, vocab: UnifiedVocab) -> Document:
    with_roles = draw(st.booleans())
    segments = []
    for i in range(draw(st.integers(0, 6))):
        role = draw(st.sampled_from(["system", "user", "assistant"])) if with_roles else None
        if draw(st.booleans()):
            segments.append(TextSegment(draw(st.text(max_size=12)), role))
        else:
            name = draw(st.sampled_from(vocab.modalities))
            segments.append(MediaSegment(name, ids=random_local_ids(vocab, name, i), role=role))
    return Document(segments)


def normalised(doc: Document) -> list[tuple]:
    """What ids can keep: adjacent text of one role merges, empty text vanishes."""
    out: list[tuple] = []
    for s in doc:
        if isinstance(s, TextSegment):
            if out and out[-1][0] == "text" and out[-1][2] == s.role:
                out[-1] = ("text", out[-1][1] + s.text, s.role)
            elif s.text:
                out.append(("text", s.text, s.role))
        else:
            out.append((s.modality, tuple(s.ids.tolist()), s.role))
    return [x for x in out if x[1] != ""]


@settings(max_examples=30, deadline=None)
@given(data=st.data(), vocab_=vocabs())
def test_random_documents_survive_ids_round_trip(
    text: TextTokenizer, data: st.DataObject, vocab_: UnifiedVocab
) -> None:
    vocab = UnifiedVocab.build(text.vocab_size, [vocab_.spec(n) for n in vocab_.modalities])
    doc = data.draw(documents(vocab))
    ids, mask = doc.to_ids(vocab, text)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
    assert int(ids[0]) == vocab.bos_id and int(ids[-1]) == vocab.eos_id and not mask[0] and mask[1:].all()
    assert Grammar(vocab).validate(ids) is None
    back = Document.from_ids(ids, vocab, text)
    assert normalised(back) == normalised(doc)
    assert torch.equal(back.to_ids(vocab, text)[0], ids)


# ---- real files end to end ---------------------------------------------------------------
def write_media(tmp_path: Path, plugins: dict[str, object]) -> dict[str, str]:
    paths = {}
    for name, ext in (("double_fixed", "txt"), ("double_grid", "png"), ("double_variable", "wav")):
        p = plugins[name]
        paths[name] = f"{name}.{ext}"
        p.write(p.example(3), str(tmp_path / paths[name]))
    return paths


def test_chat_json_with_files_to_ids_and_back(
    tmp_path: Path, text: TextTokenizer, plugins: dict, vocab: UnifiedVocab
) -> None:
    paths = write_media(tmp_path, plugins)
    chat = {
        "messages": [
            {"role": "system", "content": "a helpful robot"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "draw it"},
                    {"type": "double_grid", "path": paths["double_grid"]},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "double_variable", "path": paths["double_variable"]},
                    {"type": "text", "text": "and"},
                    {"type": "double_fixed", "path": paths["double_fixed"]},
                ],
            },
        ]
    }
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    doc = Document.load(tmp_path / "chat.json")  # relative paths resolve against the JSON's folder
    ids, mask = doc.to_ids(vocab, text, plugins, train_on="assistant")
    back = Document.from_ids(ids, vocab, text)
    assert [(type(s).__name__, s.role) for s in back] == [(type(s).__name__, s.role) for s in doc]
    assert [s.text for s in back if isinstance(s, TextSegment)] == ["a helpful robot", "draw it", "and"]
    for seg in (s for s in back if isinstance(s, MediaSegment)):
        p = plugins[seg.modality]
        want = p.encode(p.read(str(tmp_path / paths[seg.modality])))
        assert torch.equal(seg.ids, want)  # the span holds exactly what the plugin encoded
        assert torch.allclose(p.decode(seg.ids), p.decode(want))
    # assistant turn: everything after <|assistant|> through <|eos|>, nothing before
    a = int((ids == vocab.role_ids["assistant"]).nonzero()[0])
    assert not mask[: a + 1].any() and mask[a + 1 :].all()


def test_loss_mask_by_modality_callable_and_closing_tokens(text: TextTokenizer, vocab: UnifiedVocab) -> None:
    grid = random_local_ids(vocab, "double_grid", 0)
    doc = Document(
        [
            TextSegment("a red circle", "user"),
            MediaSegment("double_grid", ids=grid, role="assistant"),
            TextSegment("hello", "user"),
        ]
    )
    ids, mask = doc.to_ids(vocab, text, train_on="double_grid")
    b, e = (
        int((ids == vocab.begin_id("double_grid")).nonzero()[0]),
        int((ids == vocab.end_id("double_grid")).nonzero()[0]),
    )
    assert e - b - 1 == grid.numel()
    # the span (begin..end) and the <|user|> that closes it are trained, nothing else
    assert mask.nonzero().flatten().tolist() == list(range(b, e + 1)) + [e + 1]
    assert int(ids[e + 1]) == vocab.role_ids["user"]
    ids2, mask2 = doc.to_ids(vocab, text, train_on=lambda i, s: i == 2, add_bos=False, add_eos=True)
    assert int(ids2[0]) == vocab.role_ids["user"] and int(ids2[-1]) == vocab.eos_id
    n_hello = len(text.encode("hello"))
    assert mask2.nonzero().flatten().tolist() == list(range(len(ids2) - n_hello - 1, len(ids2)))
    _, mask3 = doc.to_ids(vocab, text, train_on="all", add_eos=False)
    assert not mask3[0] and mask3[1:].all()


def test_plain_list_and_chat_json_round_trip(tmp_path: Path) -> None:
    plain = [
        "a caption",
        {"type": "double_grid", "path": "/data/cat.png"},
        {"type": "double_fixed", "ids": [1, 2]},
    ]
    doc = Document.from_json(plain)
    assert doc.segments[1] == MediaSegment("double_grid", path="/data/cat.png")
    assert doc.to_json() == plain
    chat = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi"}, {"type": "double_fixed", "ids": [3]}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        ]
    }
    doc = Document.from_json(chat)
    doc.save(tmp_path / "d.json")
    assert Document.load(tmp_path / "d.json") == doc and doc.to_json() == chat


# ---- malformed input ------------------------------------------------------------------
def test_malformed_json_names_message_part_and_fix() -> None:
    cases = [
        (
            {"messages": [{"role": "bot", "content": "hi"}]},
            r"message 0: role 'bot' is not one of system, user, assistant",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image-url", "path": "x"}]}]},
            r"message 0 \(user\) part 0: unknown part type 'image-url'; use \"text\" or a modality name",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "double_grid", "pth": "x"}]}]},
            r"message 0 \(user\) part 0 \(double_grid\): unknown key\(s\) \['pth'\]",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "txt": "x"}]}]},
            r"message 0 \(user\) part 0: a text part is \{'type': 'text', 'text': str\}",
        ),
        (
            ["ok", {"type": "double_grid", "ids": [1.5]}],
            r"item 1 \(double_grid\): ids must be a list of integer local ids",
        ),
        (["ok", {"type": "double_grid"}], r"item 1 \(double_grid\): give 'path' \(a file\) or 'ids'"),
        ({"msgs": []}, r"a document is a dict with 'messages'.*got dict with keys \['msgs'\]"),
    ]
    for obj, message in cases:
        with pytest.raises(ValueError, match=message):
            Document.from_json(obj)


def test_malformed_segments_name_index_role_type_and_fix(
    tmp_path: Path, text: TextTokenizer, plugins: dict, vocab: UnifiedVocab
) -> None:
    good = random_local_ids(vocab, "double_grid", 0)
    cases = [
        (
            Document([MediaSegment("double_gird", ids=good)]),
            r"segment 0 \(double_gird\): modality 'double_gird' is not in the vocabulary \(did you mean 'double_grid'\?\)",
        ),
        (
            Document(
                [
                    TextSegment("hi", "user"),
                    MediaSegment("double_grid", path=str(tmp_path / "no.png"), role="user"),
                ]
            ),
            r"segment 1 \(user, double_grid\): file '.*no.png' not found; fix the path",
        ),
        (
            Document([MediaSegment("double_grid", ids=good[:-1])]),
            r"segment 0 \(double_grid\): its ids do not fit the double_grid token layout: span has \d+ steps, the layout needs \d+",
        ),
        (
            Document([MediaSegment("double_grid", ids=torch.cat([good[:-1], torch.tensor([999])]))]),
            r"segment 0 \(double_grid\): its ids do not fit .* holds local id 999",
        ),
        (
            Document([MediaSegment("double_fixed", media=torch.zeros(16))]),
            r"segment 0 \(double_fixed\): encoding its media needs the double_fixed tokenizer; pass tokenizers=",
        ),
    ]
    for doc, message in cases:
        with pytest.raises(ValueError, match=message):
            doc.to_ids(vocab, text, plugins if "file" in message else None)
    other = FixedDouble.debug()
    other.table = other.table * 0.5
    with pytest.raises(
        ValueError,
        match=r"segment 0 \(double_fixed\): the double_fixed tokenizer has fingerprint .* load the tokenizer",
    ):
        Document([MediaSegment("double_fixed", media=torch.zeros(16))]).to_ids(
            vocab, text, {"double_fixed": other}
        )
    with pytest.raises(
        ValueError,
        match=r"segment 0 \(double_fixed\): double_fixed: signal has shape \(3,\), expected \(16,\)",
    ):
        Document([MediaSegment("double_fixed", media=torch.zeros(3))]).to_ids(vocab, text, plugins)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"segment 0 \(double_grid\): .*bad.png: not a readable image"):
        Document([MediaSegment("double_grid", path=tmp_path / "bad.png")]).to_ids(vocab, text, plugins)
    with pytest.raises(
        ValueError, match=r"segment 1 \(text\): role 'user ' is not one of system, user, assistant"
    ):
        Document([TextSegment("a", "user"), TextSegment("b", "user ")])
    with pytest.raises(
        ValueError, match=r"segment 2 \(text\) has no role but segment 1 has role 'assistant'"
    ):
        Document([TextSegment("a"), TextSegment("b", "assistant"), TextSegment("c")])
    with pytest.raises(
        ValueError, match=r"train_on='images': use 'all', 'assistant', a modality of the vocabulary"
    ):
        Document([TextSegment("a")]).to_ids(vocab, text, train_on="images")
    with pytest.raises(ValueError, match=r"text tokenizer has 10 ids but the vocabulary was built for 300"):
        from test_grammar import _CharText

        Document([TextSegment("a")]).to_ids(vocab, _CharText(10))
    with pytest.raises(
        ValueError, match=r"segment 0 \(double_fixed\) holds in-memory media only; write it to a file"
    ):
        Document([MediaSegment("double_fixed", media=torch.zeros(16))]).to_json()


def test_from_ids_names_the_first_bad_position(text: TextTokenizer, vocab: UnifiedVocab) -> None:
    ids, _ = Document([TextSegment("hello"), MediaSegment("double_fixed", ids=torch.arange(16))]).to_ids(
        vocab, text
    )
    bad = ids.clone()
    bad[-3] = 5  # a text id inside the fixed span
    p = len(ids) - 3
    with pytest.raises(
        ValueError,
        match=rf"ids do not form a Tessera document: position {p}: token 5 \(text piece 5\) is not allowed; expected inside a double_fixed span: a level 0 code",
    ):
        Document.from_ids(bad, vocab, text)
    with pytest.raises(ValueError, match=r"ends inside the double_fixed span"):
        Document.from_ids(ids[:-3], vocab, text)


def test_prompt_ending_with_an_empty_assistant_turn_round_trips(
    text: TextTokenizer, vocab: UnifiedVocab
) -> None:
    doc = Document([TextSegment("draw a red circle", "user"), TextSegment("", "assistant")])
    ids, mask = doc.to_ids(vocab, text, train_on="assistant", add_eos=False)
    assert int(ids[-1]) == vocab.role_ids["assistant"] and not mask.any()
    assert Document.from_ids(ids, vocab, text) == doc
