"""The bundle folder: save/load round trip, fingerprint checks, append-only modality growth."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from doubles import FixedDouble, GridConfig, GridDouble, VariableDouble, register_doubles
from tessera.core.checkpoint import load_tensors, save_tensors
from tessera.pipelines.bundle import (
    BundleError,
    add_modality,
    load_bundle,
    replace_modality,
    save_bundle,
    tiny_bundle,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    register_doubles()
    path = tmp_path_factory.mktemp("bundle") / "b"
    bundle = tiny_bundle(plugins={"double_grid": GridDouble.debug(), "double_variable": VariableDouble.debug()})
    save_bundle(bundle, path, dtype=None)
    return path


def _copy(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "copy"))


def test_round_trip_keeps_vocabulary_tokenizers_and_logits(saved: Path, tmp_path: Path) -> None:
    a = load_bundle(saved)
    ids = torch.arange(0, a.vocab.size, 7)[None]
    save_bundle(a, tmp_path / "again", dtype=None)
    b = load_bundle(tmp_path / "again")
    assert b.vocab.manifest_hash == a.vocab.manifest_hash
    assert list(b.tokenizers) == ["double_grid", "double_variable"]
    assert b.tokenizers["double_grid"].spec == a.tokenizers["double_grid"].spec
    torch.testing.assert_close(b.model(ids), a.model(ids), rtol=0, atol=0)
    assert b.settings == a.settings and b.settings["meta"]["double_grid"].keys() == {"height", "width"}
    # bf16 on disk: the weights are the bf16-rounded originals, half the bytes
    save_bundle(a, tmp_path / "bf16")
    c = load_bundle(tmp_path / "bf16")
    w = a.model.tok_emb.weight
    torch.testing.assert_close(c.model.tok_emb.weight, w.to(torch.bfloat16).float(), rtol=0, atol=0)
    size = lambda p: (p / "llm" / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "bf16") < 0.6 * size(tmp_path / "again")


def test_tampered_tokenizer_weight_is_refused_with_the_file_and_fix(saved: Path, tmp_path: Path) -> None:
    path = _copy(saved, tmp_path)
    weights = path / "tokenizers" / "double_grid" / "weights.safetensors"
    table = load_tensors(weights)["table"]
    table[3] += 0.01
    save_tensors(weights, {"table": table})
    with pytest.raises(BundleError, match=r"tokenizers/double_grid: the double_grid tokenizer's weights have "
                                          r"fingerprint .* Restore the original weights"):
        load_bundle(path)


def test_tampered_text_model_and_foreign_llm_are_refused(saved: Path, tmp_path: Path) -> None:
    path = _copy(saved, tmp_path)
    data = bytearray((path / "text.model").read_bytes())
    data[-1] ^= 1
    (path / "text.model").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"text\.model: sha256 .* differs from the manifest"):
        load_bundle(path)
    shutil.copy(saved / "text.model", path / "text.model")
    other = tiny_bundle(tmp_path / "other", plugins={"double_fixed": FixedDouble.debug()})
    shutil.rmtree(path / "llm")
    shutil.copytree(other.path / "llm", path / "llm")
    with pytest.raises(BundleError, match=r"trained with manifest .* token ids would decode to the wrong things"):
        load_bundle(path)
    shutil.rmtree(path / "tokenizers" / "double_variable")
    with pytest.raises(BundleError, match=r"double_variable: missing"):
        load_bundle(path)


def test_add_modality_keeps_old_ids_and_old_logits(saved: Path, tmp_path: Path) -> None:
    old = load_bundle(saved)
    new = add_modality(old, FixedDouble.debug())
    assert new.vocab.modalities == ("double_grid", "double_variable", "double_fixed")
    for name in old.vocab.modalities:
        assert new.vocab.local_range(name) == old.vocab.local_range(name)
        assert new.vocab.begin_id(name) == old.vocab.begin_id(name)
    assert new.vocab.local_range("double_fixed")[0] > old.vocab.size - 1
    assert new.model.config.vocab_size == new.vocab.size > old.vocab.size
    ids = torch.randint(0, old.vocab.size, (2, 12), generator=torch.Generator().manual_seed(0))
    before, after = old.model(ids), new.model(ids)
    torch.testing.assert_close(after[..., : old.vocab.size], before, rtol=0, atol=0)
    assert old.model.config.vocab_size == old.vocab.size  # the given bundle is untouched
    save_bundle(new, tmp_path / "grown", dtype=None)
    again = load_bundle(tmp_path / "grown")
    assert again.vocab.manifest_hash == new.vocab.manifest_hash
    assert again.settings["plugins"]["double_fixed"].endswith(":FixedDouble")
    with pytest.raises(ValueError, match="already has modality 'double_fixed'"):
        add_modality(again, FixedDouble.debug())


def test_replace_modality_carries_every_row_that_keeps_its_meaning(saved: Path, tmp_path: Path) -> None:
    old = load_bundle(saved)
    finer = GridDouble(GridConfig(grey_levels=40))  # a different codebook: the ranges after it move
    new, counts = replace_modality(old, finer)
    assert new.vocab.modalities == old.vocab.modalities
    assert new.vocab.size == old.vocab.size + 24 == new.model.config.vocab_size
    assert counts == {"kept": old.vocab.size - 16, "fresh": 40}
    shift = new.vocab.local_range("double_variable")[0] - old.vocab.local_range("double_variable")[0]
    assert shift == 24 and new.vocab.begin_id("double_variable") == old.vocab.begin_id("double_variable") + 24
    # a sequence without the replaced codes: same logits for every token that kept its meaning
    lo, hi = old.vocab.local_range("double_variable")
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, old.vocab.text_size, (2, 6), generator=g)
    sound = torch.randint(lo, hi, (2, 6), generator=g)
    grid_meta = torch.full((2, 1), old.vocab.local_range("double_grid")[0] + 1)  # meta ids keep their ids
    ids = torch.cat([text, grid_meta, torch.full((2, 1), old.vocab.begin_id("double_variable")), sound], 1)
    new_ids = torch.where(ids >= old.vocab.begin_id("double_variable"), ids + shift, ids)
    kept = torch.cat([torch.arange(old.vocab.local_range("double_grid")[0] + old.tokenizers["double_grid"].spec.layout.meta_size),
                      torch.arange(old.vocab.local_range("double_grid")[1], old.vocab.size)])
    kept_new = torch.where(kept >= old.vocab.begin_id("double_variable"), kept + shift, kept)
    with torch.inference_mode():
        torch.testing.assert_close(new.model(new_ids)[..., kept_new], old.model(ids)[..., kept], rtol=0, atol=0)
    assert old.model.config.vocab_size == old.vocab.size  # the given bundle is untouched
    save_bundle(new, tmp_path / "replaced", dtype=None)
    again = load_bundle(tmp_path / "replaced")
    assert again.tokenizers["double_grid"].spec.layout.levels == (40,)
    assert again.settings["sampling"] == old.settings["sampling"]  # tuned settings survive
    with pytest.raises(ValueError, match="no modality 'double_fixed' to replace"):
        replace_modality(old, FixedDouble.debug())


def test_not_a_bundle_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"not a Tessera bundle \(no manifest.json\); build one"):
        load_bundle(tmp_path)
