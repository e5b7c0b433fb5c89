"""The built-in corpus: deterministic documents, held-out scenes never trained on, guidance
dropout, the built-in sources' captions, and token shards the trainer reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from doubles import GridDouble, VariableDouble, register_doubles
from tessera.core.document import MediaSegment, TextSegment
from tessera.llm.data import TokenShardReader
from tessera.pipelines.bundle import Bundle, tiny_bundle
from tessera.pipelines.corpus import CorpusConfig, builtin_sources, documents, scene_seed, tokenize_corpus
from tessera.pipelines.tasks import text_to_media_prompt


def _sources() -> dict:
    """Media and a caption that names the scene seed, for the two doubles."""
    return {"double_grid": lambda p, s: (p.example(s), f"grid scene {s}"),
            "double_variable": lambda p, s: (p.example(s), f"sound scene {s}")}


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    register_doubles()
    return tiny_bundle(plugins={"double_grid": GridDouble.debug(), "double_variable": VariableDouble.debug()})


def _texts(doc) -> list[str]:
    return [s.text for s in doc.segments if isinstance(s, TextSegment)]


def test_documents_are_deterministic_and_cover_every_task(bundle: Bundle) -> None:
    config = CorpusConfig.debug()
    a = list(documents(bundle.tokenizers, n=40, config=config, sources=_sources()))
    b = list(documents(bundle.tokenizers, n=40, config=config, sources=_sources()))
    for x, y in zip(a, b, strict=True):
        ix, mx = x.to_ids(bundle.vocab, bundle.text, bundle.tokenizers)
        iy, my = y.to_ids(bundle.vocab, bundle.text, bundle.tokenizers)
        assert torch.equal(ix, iy) and torch.equal(mx, my)
    kinds = set()
    for doc in a:
        roles = [s.role for s in doc.segments]
        media = [s for s in doc.segments if isinstance(s, MediaSegment)]
        kinds.add("interleaved" if roles[0] is None else "to-media" if media[0].role == "assistant" else "to-text")
    assert kinds == {"interleaved", "to-media", "to-text"}
    assert {s.modality for d in a for s in d.segments if isinstance(s, MediaSegment)} == {"double_grid", "double_variable"}
    other = list(documents(bundle.tokenizers, n=40, config=CorpusConfig(heldout=16, seed=1), sources=_sources()))
    assert [_texts(d) for d in other] != [_texts(d) for d in a]


def test_start_extends_the_stream_with_new_scenes(bundle: Bundle) -> None:
    config = CorpusConfig(heldout=16, modality_mix={"double_grid": 3.0, "double_variable": 1.0})
    whole = [_texts(d) for d in documents(bundle.tokenizers, n=60, config=config, sources=_sources())]
    head = [_texts(d) for d in documents(bundle.tokenizers, n=25, config=config, sources=_sources())]
    tail = [_texts(d) for d in documents(bundle.tokenizers, n=35, start=25, config=config, sources=_sources())]
    assert head + tail == whole
    with pytest.raises(ValueError, match="start=-1"):
        next(documents(bundle.tokenizers, n=1, start=-1, config=config, sources=_sources()))


def test_heldout_scenes_are_never_in_training(bundle: Bundle) -> None:
    config = CorpusConfig.debug()
    train = {t for d in documents(bundle.tokenizers, n=200, config=config, sources=_sources()) for t in _texts(d)}
    held = {t for d in documents(bundle.tokenizers, n=32, split="heldout", config=config, sources=_sources())
            for t in _texts(d)}
    scenes = lambda texts: {int(t.rsplit(" ", 1)[1]) for t in texts if "scene" in t}  # noqa: E731
    assert scenes(held) and scenes(held) <= set(range(16))
    assert scenes(train) and min(scenes(train)) >= 16
    with pytest.raises(ValueError, match="outside the 16 held-out scenes"):
        scene_seed("heldout", 16, config)


def test_modality_and_per_modality_task_mixes(bundle: Bundle) -> None:
    config = CorpusConfig(heldout=16, modality_mix={"double_grid": 3.0, "double_variable": 1.0},
                          task_mix={"double_variable": {"media-to-text": 1.0}})
    docs = list(documents(bundle.tokenizers, n=200, config=config, sources=_sources()))
    kinds = [next(s.modality for s in d.segments if isinstance(s, MediaSegment)) for d in docs]
    assert 120 <= kinds.count("double_grid") <= 180  # 3:1
    sound = [d for d, k in zip(docs, kinds, strict=True) if k == "double_variable"]
    assert all(d.segments[-1].role == "assistant" and isinstance(d.segments[-1], TextSegment) for d in sound)
    # every document of a modality gets the next scene: no scene is drawn twice
    scenes = [t for d in docs for t in _texts(d) if "scene" in t]
    assert len(scenes) == len(set(scenes))
    with pytest.raises(ValueError, match="no weight for \\['double_variable'\\]"):
        next(documents(bundle.tokenizers, n=1, config=CorpusConfig(modality_mix={"double_grid": 1.0}),
                       sources=_sources()))
    with pytest.raises(ValueError, match="task_mix\\['double_grid'\\]"):
        CorpusConfig(task_mix={"double_grid": {"captioning": 1.0}})
    with pytest.raises(ValueError, match="modality_mix=.*non-negative"):
        CorpusConfig(modality_mix={"double_grid": -1.0})


def test_build_config_checks_its_corpus_mix_up_front() -> None:
    from tessera.pipelines.build_default import BuildConfig

    assert BuildConfig().corpus_config().modality_mix == {"image": 0.5, "video": 0.1, "speech": 0.4}
    with pytest.raises(ValueError, match="no weight for \\['video'\\]"):
        BuildConfig(modality_mix={"image": 1.0, "speech": 1.0})
    with pytest.raises(ValueError, match="task_mix\\['speech'\\]"):
        BuildConfig(task_mix={"speech": {}})


def test_guidance_dropout_leaves_out_some_captions(bundle: Bundle) -> None:
    config = CorpusConfig(heldout=16, cfg_dropout=0.5, mix={"text-to-media": 1.0})
    prompts = [_texts(d)[0] for d in documents(bundle.tokenizers, n=60, config=config, sources=_sources())]
    empty = {text_to_media_prompt(k, "", v) for k in ("image", "audio") for v in range(3)}
    dropped = sum(p in empty for p in prompts)
    assert 15 <= dropped <= 45


def test_builtin_image_source_captions_its_scene() -> None:
    from tessera.modalities.world.visual import sample_image_scene

    class FakeImage:
        def example(self, seed: int) -> int:
            return seed

    media, caption = builtin_sources()["image"](FakeImage(), 1234)
    assert media == 1234 and caption == sample_image_scene(1234).caption


def test_tokenize_corpus_writes_shards_the_trainer_reads(bundle: Bundle, tmp_path: Path) -> None:
    index = tokenize_corpus(bundle, 24, tmp_path / "shards", config=CorpusConfig.debug(), sources=_sources(),
                            shard_size=10, progress=False)
    assert index["docs"] == 24 and len(index["shards"]) == 3
    assert index["manifest_hash"] == bundle.vocab.manifest_hash
    reader = TokenShardReader(tmp_path / "shards", seq_len=64, expected_manifest_hash=bundle.vocab.manifest_hash,
                              loop=False)
    batch = next(reader.batches(2))
    assert batch.ids.max() < bundle.vocab.size and batch.loss_weight.sum() > 0
