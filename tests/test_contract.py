"""Contract tests over the registry (timm-style): every registered modality plugin - the
test doubles, the installed template plugin, and whatever built-ins exist - is checked
through ``cls.debug()`` the day it registers."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from doubles import register_doubles
from tessera.core.registry import registry
from tessera.core.spec import ModalitySpec
from tessera.core.vocab import UnifiedVocab
from torch import Tensor

register_doubles()
NAMES = list(registry)


@cache
def plugin(name: str) -> Any:
    torch.manual_seed(0)
    return registry[name].debug()


@cache
def sample(name: str) -> tuple[Any, Tensor]:
    p = plugin(name)
    media = p.example(0)
    return media, p.encode(media)


def same_shape(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape
    return type(a) is type(b)


pytestmark = pytest.mark.parametrize("name", NAMES)


def test_spec_matches_the_class(name: str) -> None:
    cls, spec = registry[name], plugin(name).spec
    assert isinstance(spec, ModalitySpec)
    assert (spec.name, spec.media_kind) == (cls.name, cls.media_kind)
    assert isinstance(spec.fingerprint, str) and spec.fingerprint
    assert ModalitySpec.from_dict(spec.to_dict()) == spec


def test_ids_are_local_and_fit_the_layout(name: str) -> None:
    layout = plugin(name).spec.layout
    _, ids = sample(name)
    assert isinstance(ids, Tensor) and ids.dtype == torch.long and ids.ndim == 1
    assert 0 <= int(ids.min()) and int(ids.max()) < layout.local_size
    meta, codes = layout.unflatten(ids)  # raises if the ids break the layout
    assert codes.shape[1] == layout.num_levels
    assert ids.numel() <= layout.max_span_tokens
    if layout.kind != "variable":
        assert codes.shape[0] == layout.steps_for(meta)
    vocab = UnifiedVocab.build(10, [plugin(name).spec])
    assert torch.equal(vocab.to_local(name, vocab.to_global(name, ids)), ids)


def test_decode_gives_the_media_shape(name: str) -> None:
    media, ids = sample(name)
    assert same_shape(plugin(name).decode(ids), media)


def test_every_code_the_layout_allows_decodes(name: str) -> None:
    """The grammar lets the LLM emit any code of a level's range, so the plugin must
    decode all of them (a layout wider than the quantizer's real codebook fails here)."""
    p = plugin(name)
    layout = p.spec.layout
    media, ids = sample(name)
    meta, codes = layout.unflatten(ids)
    for extreme in (torch.zeros_like(codes), torch.tensor(layout.levels) - 1 + torch.zeros_like(codes)):
        assert same_shape(p.decode(layout.flatten(extreme, meta)), media)


def test_encode_is_deterministic(name: str) -> None:
    media, ids = sample(name)
    assert torch.equal(plugin(name).encode(media), ids)
    assert same_shape(plugin(name).example(0), media)


def test_save_load_keeps_ids_and_fingerprint(name: str, tmp_path: Path) -> None:
    p = plugin(name)
    media, ids = sample(name)
    p.save(str(tmp_path))
    back = registry[name].load(str(tmp_path))
    assert back.spec == p.spec
    assert torch.equal(back.encode(media), ids)


def test_write_read_round_trip(name: str, tmp_path: Path) -> None:
    p = plugin(name)
    media, _ = sample(name)
    path = tmp_path / f"media{registry[name].file_extensions[0]}"
    p.write(media, str(path))
    assert same_shape(p.read(str(path)), media)


def test_bad_input_raises_value_error(name: str, tmp_path: Path) -> None:
    p = plugin(name)
    layout = p.spec.layout
    with pytest.raises(ValueError):
        p.encode("not media")
    with pytest.raises(ValueError):
        p.encode(torch.empty(0))
    with pytest.raises(ValueError):
        p.decode(torch.tensor([layout.local_size] * layout.max_span_tokens))
    junk = tmp_path / f"junk{registry[name].file_extensions[0]}"
    junk.write_bytes(b"\x00\x01 definitely not media \xff")
    with pytest.raises(ValueError, match="junk"):
        p.read(str(junk))
