"""Hugging Face export: the folder loads as LlamaForCausalLM with the same logits as ours
(multi-head and grouped-query, tied and untied), and the vocabulary files travel with it."""

from __future__ import annotations

import json

import pytest
import torch
from tessera.core.vocab import ManifestMismatchError, UnifiedVocab
from tessera.llm.export import export_hf
from tessera.llm.model import LLMConfig, TesseraLM

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(("n_kv_heads", "tied"), [(4, False), (1, True)], ids=["mha-untied", "gqa-tied"])
def test_hf_llama_gives_our_logits(tmp_path, n_kv_heads: int, tied: bool) -> None:
    torch.manual_seed(0)
    config = LLMConfig.preset("debug", 96)
    config.n_kv_heads, config.tie_embeddings, config.rope_theta = n_kv_heads, tied, 500.0
    ours = TesseraLM(config).eval()
    export_hf(ours, tmp_path, manifest=None, sentencepiece_model=None)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert hf.config.num_key_value_heads == n_kv_heads and hf.config.tie_word_embeddings == tied
    ids = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)


def test_export_writes_manifest_and_tokenizer_and_checks_the_manifest(tmp_path) -> None:
    vocab = UnifiedVocab.build(40)
    model = TesseraLM(LLMConfig.preset("debug", vocab.size))
    model.save_pretrained(tmp_path / "llm", manifest_hash=vocab.manifest_hash)
    spm = tmp_path / "text.model"
    spm.write_bytes(b"sentencepiece bytes")
    out = export_hf(tmp_path / "llm", tmp_path / "hf", manifest=vocab.manifest(), sentencepiece_model=spm)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        vocab.bos_id, vocab.eos_id, vocab.pad_id)
    assert json.loads((out / "manifest.json").read_text())["hash"] == vocab.manifest_hash
    assert (out / "tokenizer.model").read_bytes() == b"sentencepiece bytes"
    other = UnifiedVocab.build(40, text_sha256="f" * 64)
    with pytest.raises(ManifestMismatchError, match=vocab.manifest_hash):
        export_hf(tmp_path / "llm", tmp_path / "hf2", manifest=other.manifest(), sentencepiece_model=None)
