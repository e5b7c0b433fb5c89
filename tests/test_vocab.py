"""Unified vocabulary + manifest (core/vocab.py): id layout, append-only growth, range
checks, explain, manifest hash properties, compatibility errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tessera.core.spec import MetaField, ModalitySpec, TokenLayout
from tessera.core.vocab import (
    GLOBAL_SPECIALS,
    ManifestMismatchError,
    UnifiedVocab,
    diff_manifests,
    manifest_hash,
)


def grid_spec(name: str = "image", fingerprint: str = "f" * 64) -> ModalitySpec:
    meta = (MetaField(name="height", low=1, high=4), MetaField(name="width", low=2, high=5))
    layout = TokenLayout(kind="grid", levels=(16,), meta=meta)
    return ModalitySpec(name=name, version="1", media_kind="image", layout=layout, fingerprint=fingerprint)


def speech_spec(fingerprint: str = "s" * 64) -> ModalitySpec:
    layout = TokenLayout(kind="variable", levels=(8, 8, 8), max_steps=50)
    return ModalitySpec(
        name="speech", version="2", media_kind="audio", layout=layout, fingerprint=fingerprint,
        special_tokens=("<|speech_pause|>",),
    )


@pytest.fixture()
def vocab() -> UnifiedVocab:
    return UnifiedVocab.build(100, [grid_spec(), speech_spec()], text_sha256="t" * 64)


# ---- the id layout ----------------------------------------------------------------------
def test_layout_matches_the_agreed_order(vocab: UnifiedVocab) -> None:
    assert [vocab.special_id(t) for t in GLOBAL_SPECIALS] == list(range(100, 106))
    assert (vocab.bos_id, vocab.eos_id, vocab.pad_id) == (100, 101, 102)
    assert vocab.role_ids == {"system": 103, "user": 104, "assistant": 105}
    assert (vocab.begin_id("image"), vocab.end_id("image")) == (106, 107)
    # image local: 4 + 4 meta ids + 16 codes = 24
    assert vocab.local_range("image") == (108, 132)
    assert (vocab.begin_id("speech"), vocab.end_id("speech"), vocab.special_id("<|speech_pause|>")) == (132, 133, 134)
    assert vocab.local_range("speech") == (135, 135 + 24)
    assert vocab.size == 159 and vocab.modalities == ("image", "speech")
    assert vocab.spec("speech") == speech_spec()


def test_to_global_to_local_round_trip_keeps_shape(vocab: UnifiedVocab) -> None:
    local = torch.randint(0, 24, (3, 5))
    g = vocab.to_global("speech", local)
    assert g.shape == (3, 5) and g.dtype == torch.long
    assert ((g >= 135) & (g < 159)).all()
    assert torch.equal(vocab.to_local("speech", g), local)
    assert int(vocab.to_global("image", 0)) == 108


def test_explain_names_every_kind_of_id(vocab: UnifiedVocab) -> None:
    assert vocab.explain(7) == "id 7: text piece 7"
    assert vocab.explain(104) == "id 104: special token <|user|>"
    assert vocab.explain(106) == "id 106: special token <|begin_image|> (image)"
    assert vocab.explain(134) == "id 134: special token <|speech_pause|> (speech)"
    assert vocab.explain(108) == "id 108: image meta height=1 (local 0)"
    assert vocab.explain(112) == "id 112: image meta width=2 (local 4)"
    assert vocab.explain(116 + 17 - 16) == "id 117: image level 0 code 1 (local 9)"
    # speech level 2 code 5 = local 16 + 5
    assert vocab.explain(135 + 21) == "id 156: speech level 2 code 5 (local 21)"
    assert [vocab.modality_of(i) for i in (5, 101, 106, 131, 132, 158)] == [
        None, None, "image", "image", "speech", "speech"]


def test_range_errors_name_the_id_and_the_range(vocab: UnifiedVocab) -> None:
    with pytest.raises(ValueError, match=r"local id 24 is outside 'speech''s local range \[0, 24\)"):
        vocab.to_global("speech", torch.tensor([0, 24]))
    with pytest.raises(ValueError, match=r"local id -1 is outside"):
        vocab.to_global("image", -1)
    with pytest.raises(ValueError, match=r"global id 106 is not a 'image' code: 'image' local ids are "
                                         r"\[108, 132\) \(id 106: special token <\|begin_image\|>.*strip begin/end"):
        vocab.to_local("image", [108, 106])
    with pytest.raises(ValueError, match=r"global id 500 .*outside the vocabulary"):
        vocab.to_local("image", 500)
    with pytest.raises(ValueError, match="must be integers, got dtype torch.float32; pass a LongTensor"):
        vocab.to_global("image", torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"id 159 is outside the vocabulary \[0, 159\)"):
        vocab.explain(159)
    with pytest.raises(ValueError, match=r"modality 'imag' is not in this vocabulary \(did you mean 'image'\?\).*add_modality"):
        vocab.local_range("imag")
    with pytest.raises(ValueError, match=r"special token '<\|bso\|>' is not in this vocabulary \(did you mean '<\|bos\|>'"):
        vocab.special_id("<|bso|>")


def test_add_modality_errors(vocab: UnifiedVocab) -> None:
    with pytest.raises(ValueError, match="'image' is already in the vocabulary.*added once"):
        vocab.add_modality(grid_spec())
    clash = ModalitySpec(
        name="motion", version="1", media_kind="motion", fingerprint="m",
        layout=TokenLayout(kind="fixed", levels=(4,), steps=2), special_tokens=("<|speech_pause|>",),
    )
    with pytest.raises(ValueError, match=r"\['<\|speech_pause\|>'\] already belong.*\[134\].*modality-specific name"):
        vocab.add_modality(clash)
    unserialisable = ModalitySpec(
        name="motion", version="1", media_kind="motion", fingerprint="m",
        layout=TokenLayout(kind="fixed", levels=(4,), steps=2), extra={"fn": object()},
    )
    with pytest.raises(ValueError, match="not JSON-serialisable.*keep only str/int"):
        vocab.add_modality(unserialisable)
    with pytest.raises(ValueError, match="needs a ModalitySpec, got dict; pass plugin.spec"):
        vocab.add_modality(grid_spec().to_dict())
    repeated = ModalitySpec(
        name="motion", version="1", media_kind="motion", fingerprint="m",
        layout=TokenLayout(kind="fixed", levels=(4,), steps=2), special_tokens=("<|begin_motion|>",),
    )
    with pytest.raises(ValueError, match=r"special_tokens=\['<\|begin_motion\|>'\] repeat a token.*list each token once"):
        vocab.add_modality(repeated)
    with pytest.raises(ValueError, match="text_size=0.*at least 1 id"):
        UnifiedVocab.build(0)
    with pytest.raises(ValueError, match=r"text_sha256=123 must be a hex string or None \(TextTokenizer.sha256\)"):
        UnifiedVocab.build(10, text_sha256=123)  # type: ignore[arg-type]
    with pytest.raises(ManifestMismatchError, match="a manifest is a dict, got list"):
        UnifiedVocab.from_manifest([])  # type: ignore[arg-type]


# ---- manifest -----------------------------------------------------------------------------
def test_manifest_round_trip_through_a_file(vocab: UnifiedVocab, tmp_path: Path) -> None:
    vocab.save_manifest(tmp_path / "manifest.json")
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["schema_version"] == 1 and raw["hash"] == manifest_hash(raw) == vocab.manifest_hash
    assert raw["modalities"][1]["special_ids"] == {"<|speech_pause|>": 134}
    back = UnifiedVocab.load_manifest(tmp_path / "manifest.json")
    assert back == vocab and back.manifest() == vocab.manifest()
    vocab.check_compatible(back.manifest_hash)  # no error


def test_corrupt_or_edited_manifests_are_refused(vocab: UnifiedVocab, tmp_path: Path) -> None:
    m = vocab.manifest()
    edited = copy.deepcopy(m)
    edited["modalities"][0]["start"] = 109
    with pytest.raises(ManifestMismatchError, match="edited or corrupted"):
        UnifiedVocab.from_manifest(edited)
    edited["hash"] = manifest_hash(edited)  # hash fixed up, but the ids no longer follow from the specs
    with pytest.raises(ManifestMismatchError, match=r"ids do not follow from its specs: modality 'image' range: "
                                                    r"expected \[108, 132\], got \[109, 132\]"):
        UnifiedVocab.from_manifest(edited)
    with pytest.raises(ManifestMismatchError, match="schema_version=7, this Tessera reads version 1"):
        UnifiedVocab.from_manifest({**m, "schema_version": 7})
    with pytest.raises(ManifestMismatchError, match="missing or mistypes field 'text'"):
        UnifiedVocab.from_manifest({"schema_version": 1})
    (tmp_path / "bad.json").write_text(json.dumps({**m, "size": 3}))
    with pytest.raises(ManifestMismatchError, match="bad.json: manifest hash"):
        UnifiedVocab.load_manifest(tmp_path / "bad.json")


def test_check_compatible_says_what_differs(vocab: UnifiedVocab) -> None:
    trained = UnifiedVocab.build(100, [grid_spec(fingerprint="0" * 64), speech_spec()], text_sha256="u" * 64)
    with pytest.raises(ManifestMismatchError) as e:
        vocab.check_compatible(trained.manifest_hash, trained.manifest())
    msg = str(e.value)
    assert "text model sha256: expected 'uuuu" in msg
    assert "modality 'image' fingerprint: expected '0000" in msg
    assert "speech" not in msg and "Load the checkpoint with its own manifest" in msg
    with pytest.raises(ManifestMismatchError, match="pass the checkpoint's manifest as expected_manifest"):
        vocab.check_compatible(trained.manifest_hash)


def test_diff_manifests_reports_missing_reordered_and_resized() -> None:
    a = UnifiedVocab.build(100, [grid_spec(), speech_spec()]).manifest()
    b = UnifiedVocab.build(120, [speech_spec()]).manifest()
    diffs = diff_manifests(a, b)
    assert "text model size: expected 100, got 120" in diffs
    assert "modality 'image': expected, missing" in diffs
    assert "modality 'speech' position: expected 1, got 0" in diffs
    assert any(d.startswith("modality 'speech' range") for d in diffs)
    assert diff_manifests(a, a) == []


# ---- properties (hypothesis) -------------------------------------------------------------
NAMES = ("alpha", "beta", "gamma", "delta", "eps")


@st.composite
def layouts(draw: st.DrawFn) -> TokenLayout:
    kind = draw(st.sampled_from(["fixed", "grid", "variable"]))
    levels = tuple(draw(st.lists(st.integers(1, 50), min_size=1, max_size=3)))
    if kind == "fixed":
        return TokenLayout(kind=kind, levels=levels, steps=draw(st.integers(1, 20)))
    if kind == "variable":
        return TokenLayout(kind=kind, levels=levels, max_steps=draw(st.integers(1, 20)))
    n = draw(st.integers(1, 3))
    meta = tuple(MetaField(name=f"m{i}", low=draw(st.integers(0, 2)), high=draw(st.integers(3, 6))) for i in range(n))
    return TokenLayout(kind=kind, levels=levels, meta=meta)


@st.composite
def spec_lists(draw: st.DrawFn) -> list[ModalitySpec]:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    return [
        ModalitySpec(
            name=n, version="1", media_kind="timeseries", layout=draw(layouts()),
            fingerprint=draw(st.text("0123456789abcdef", min_size=4, max_size=8)),
            special_tokens=tuple(f"<|{n}_{t}|>" for t in range(draw(st.integers(0, 2)))),
        )
        for n in names
    ]


@settings(max_examples=40, deadline=None)
@given(specs=spec_lists(), text_size=st.integers(1, 1000))
def test_adding_a_modality_keeps_every_old_id(specs: list[ModalitySpec], text_size: int) -> None:
    old = UnifiedVocab.build(text_size, specs[:-1])
    new = old.add_modality(specs[-1])
    assert new.size == old.size + 2 + len(specs[-1].special_tokens) + specs[-1].layout.local_size
    assert new.local_range(specs[-1].name)[1] == new.size
    for i in range(old.size):
        assert new.explain(i) == old.explain(i)
    old_m, new_m = old.manifest(), new.manifest()
    assert new_m["specials"] == old_m["specials"]
    assert new_m["modalities"][: len(specs) - 1] == old_m["modalities"]
    assert UnifiedVocab.from_manifest(new_m) == new  # from_manifest rebuilds the identical vocab


@settings(max_examples=40, deadline=None)
@given(specs=spec_lists(), text_size=st.integers(1, 1000), data=st.data())
def test_manifest_hash_is_stable_and_sensitive(specs: list[ModalitySpec], text_size: int, data: st.DataObject) -> None:
    v = UnifiedVocab.build(text_size, specs, text_sha256="abc")
    # stable: rebuilt from the same inputs, or through JSON
    assert UnifiedVocab.build(text_size, specs, text_sha256="abc").manifest_hash == v.manifest_hash
    assert UnifiedVocab.from_manifest(json.loads(json.dumps(v.manifest()))).manifest_hash == v.manifest_hash
    # sensitive: change one range, token, fingerprint or the text model
    i = data.draw(st.integers(0, len(specs) - 1))
    s = specs[i]
    change = data.draw(st.sampled_from(["fingerprint", "levels", "token", "text_size", "text_sha", "order"]))
    changed = list(specs)
    if change == "fingerprint":
        changed[i] = ModalitySpec.from_dict({**s.to_dict(), "fingerprint": s.fingerprint + "0"})
    elif change == "levels":
        layout = s.layout.to_dict()
        layout["levels"] = [layout["levels"][0] + 1, *layout["levels"][1:]]
        changed[i] = ModalitySpec.from_dict({**s.to_dict(), "layout": layout})
    elif change == "token":
        changed[i] = ModalitySpec.from_dict({**s.to_dict(), "special_tokens": [*s.special_tokens, "<|x|>"]})
    elif change == "order":
        zeta = ModalitySpec.from_dict({**s.to_dict(), "name": "zeta", "special_tokens": []})
        changed = changed[::-1] if len(specs) > 1 else [*specs, zeta]
    other = UnifiedVocab.build(
        text_size + (change == "text_size"), changed, text_sha256="abd" if change == "text_sha" else "abc"
    )
    assert other.manifest_hash != v.manifest_hash
    assert diff_manifests(v.manifest(), other.manifest())  # and the difference can be named


def test_json_round_trip_of_tuple_extras_is_the_same_vocab() -> None:
    spec = ModalitySpec.from_dict({**grid_spec().to_dict(), "extra": {"patch": (2, 2), "rate": 16000.0}})
    vocab = UnifiedVocab.build(50, [spec])
    back = UnifiedVocab.from_manifest(json.loads(json.dumps(vocab.manifest())))
    assert back == vocab and hash(back) == hash(vocab)
    assert back.spec("image").extra == {"patch": [2, 2], "rate": 16000.0}
