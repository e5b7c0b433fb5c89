"""Task pipelines on a tiny bundle: decodable media of the right kind and shape, seeded
determinism, batches, guidance, chat content parts, and the task table."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from doubles import GridDouble, VariableDouble, register_doubles
from tessera.llm.generate import SamplingConfig
from tessera.pipelines.bundle import Bundle, tiny_bundle
from tessera.pipelines.tasks import (
    ChatPipeline,
    MediaToTextPipeline,
    TextToMediaPipeline,
    tasks_for,
    text_to_media_prompt,
)


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    register_doubles()
    return tiny_bundle(plugins={"double_grid": GridDouble.debug(), "double_variable": VariableDouble.debug()})


def test_text_to_media_returns_media_of_the_settings_shape_and_is_seeded(bundle: Bundle) -> None:
    grid = TextToMediaPipeline(bundle, "double_grid")
    meta = bundle.settings["meta"]["double_grid"]
    image = grid("a red circle on the left", seed=3)
    assert image.shape == (3, 2 * meta["height"], 2 * meta["width"]) and image.dtype == torch.float32
    torch.testing.assert_close(grid("a red circle on the left", seed=3), image, rtol=0, atol=0)
    batch = grid(["a red circle on the left", "a blue square at the top"], seed=3)
    assert len(batch) == 2 and all(b.shape == image.shape for b in batch)
    hot = {"text": SamplingConfig(temperature=0.0), "double_grid": SamplingConfig(temperature=5.0)}
    assert not torch.equal(grid("x", seed=1, sampling=hot), grid("x", seed=2, sampling=hot))

    audio = TextToMediaPipeline(bundle, "double_variable")
    wave = audio("say hello", seed=0)
    assert wave.ndim == 1 and 1 <= wave.numel() <= 64 and float(wave.abs().max()) <= 1
    torch.testing.assert_close(audio("say hello", seed=0), wave, rtol=0, atol=0)
    short = audio("say hello", seed=0, max_new_tokens=7)  # cut to whole steps: 2 steps of 3 levels
    assert 1 <= short.numel() <= 2


def test_guidance_changes_the_result_and_uses_the_caption_free_prompt(bundle: Bundle) -> None:
    grid = TextToMediaPipeline(bundle, "double_grid")
    greedy = {"text": SamplingConfig(temperature=0.0), "double_grid": SamplingConfig(temperature=0.0)}
    plain = grid("a red circle", sampling=greedy, cfg_scale=1.0)
    guided = grid("a red circle", sampling=greedy, cfg_scale=8.0)
    assert not torch.equal(plain, guided)
    assert grid._prompt("").numel() < grid._prompt("a red circle").numel()
    assert bundle.text.decode(grid._prompt("")[2:-4].tolist()) == text_to_media_prompt("image", "")
    with pytest.raises(ValueError, match="cfg_scale keys"):
        grid("x", cfg_scale={"nope": 2.0})


def test_best_of_keeps_the_sample_the_model_captions_best(bundle: Bundle) -> None:
    """best_of=k samples k spans per caption (the rows of a batch of the caption repeated k
    times, same seed) and keeps the one whose caption log-likelihood is highest."""
    grid = TextToMediaPipeline(bundle, "double_grid")
    captions = ["a red circle on the left", "a blue square at the top"]
    k = 3
    spans: list[torch.Tensor] = []
    span = grid._span
    grid._span = lambda row: spans.append(span(row)) or spans[-1]  # type: ignore[method-assign]
    try:
        every = grid([c for c in captions for _ in range(k)], seed=5, best_of=1)
    finally:
        del grid._span
    scores = grid.caption_log_likelihood(spans, [c for c in captions for _ in range(k)]).view(2, k)
    assert torch.isfinite(scores).all() and (scores < 0).all()
    assert len({tuple(s.tolist()) for s in spans}) > 1  # the k samples differ
    best = grid(captions, seed=5, best_of=k)
    for i, j in enumerate(scores.argmax(1).tolist()):
        torch.testing.assert_close(best[i], every[i * k + j], rtol=0, atol=0)
    # the bundle's settings give the default; an empty caption keeps its first sample
    bundle.settings["best_of"] = {"double_grid": k}
    try:
        torch.testing.assert_close(grid(captions, seed=5), best, rtol=0, atol=0)
        torch.testing.assert_close(grid("", seed=5), grid(["", "", ""], seed=5, best_of=1)[0], rtol=0, atol=0)
        bundle.settings["best_of"] = {"double_grid": 0}
        with pytest.raises(ValueError, match=r"settings\['best_of'\]\['double_grid'\]=0 must be an integer >= 1"):
            grid("x")
    finally:
        del bundle.settings["best_of"]
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"best_of={bad!r} must be an integer >= 1"):
            grid("x", best_of=bad)


def test_media_to_text_reads_media_and_paths_and_is_deterministic(bundle: Bundle, tmp_path) -> None:
    plugin = bundle.tokenizers["double_grid"]
    pipe = MediaToTextPipeline(bundle, "double_grid")
    image = plugin.example(1)
    text = pipe(image, max_new_tokens=12)
    assert isinstance(text, str) and pipe(image, max_new_tokens=12) == text
    plugin.write(image, str(tmp_path / "x.png"))
    assert pipe([str(tmp_path / "x.png"), image], max_new_tokens=12) == [text, text]
    with pytest.raises(ValueError, match="nope.png: no such file"):
        pipe(str(tmp_path / "nope.png"))


def test_chat_returns_content_parts_that_decode(bundle: Bundle) -> None:
    chat = ChatPipeline(bundle)
    messages = [{"role": "user", "content": [{"type": "text", "text": "draw a picture"},
                                             {"type": "double_grid", "media": bundle.tokenizers["double_grid"].example(2)}]}]
    hot = {"text": SamplingConfig(temperature=1.5)}
    seen = set()
    for seed in range(2):
        parts = chat(messages, seed=seed, sampling=hot, max_new_tokens=60)
        assert isinstance(parts, list) and parts
        for part in parts:
            assert part["type"] in {"text", "double_grid", "double_variable"}
            seen.add(part["type"])
            if part["type"] != "text":
                plugin = bundle.tokenizers[part["type"]]
                torch.testing.assert_close(plugin.decode(torch.tensor(part["ids"])), part["media"])
    assert "text" in seen
    again = chat(messages, seed=0, sampling=hot, max_new_tokens=60)
    first = chat(messages, seed=0, sampling=hot, max_new_tokens=60)
    assert [p["type"] for p in again] == [p["type"] for p in first]
    with pytest.raises(ValueError, match="modality 'image' is not in this bundle"):
        chat([{"role": "user", "content": [{"type": "image", "media": None}]}])


def test_compiled_bundle_gives_the_eager_outputs(bundle: Bundle) -> None:
    """Bundle.compile (``--compile`` on generate/chat/eval/demo) decodes through torch.compile
    in every pipeline and changes nothing but the speed: same seeds, same outputs."""
    compiled = dataclasses.replace(bundle, compile=True)
    counters = torch._dynamo.utils.counters
    graphs = counters["stats"]["unique_graphs"]
    captions = ["a red circle on the left", "a blue square"]
    for modality in ("double_grid", "double_variable"):
        eager = TextToMediaPipeline(bundle, modality)(captions, seed=5, cfg_scale=3.0)
        fast = TextToMediaPipeline(compiled, modality)(captions, seed=5, cfg_scale=3.0)
        for a, b in zip(eager, fast, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    image = bundle.tokenizers["double_grid"].example(1)
    assert (MediaToTextPipeline(compiled, "double_grid")([image, image], seed=2, max_new_tokens=12)
            == MediaToTextPipeline(bundle, "double_grid")([image, image], seed=2, max_new_tokens=12))
    messages = [{"role": "user", "content": "draw a picture"}]
    eager_parts = ChatPipeline(bundle)(messages, seed=1, max_new_tokens=40)
    fast_parts = ChatPipeline(compiled)(messages, seed=1, max_new_tokens=40)
    assert [(p["type"], p.get("text"), p.get("ids")) for p in fast_parts] == \
        [(p["type"], p.get("text"), p.get("ids")) for p in eager_parts]
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo really compiled the decode step


def test_tasks_for_covers_every_modality_both_ways(bundle: Bundle) -> None:
    tasks = tasks_for(bundle)
    assert set(tasks) == {"text-to-double_grid", "double_grid-to-text", "text-to-double_variable",
                          "double_variable-to-text", "chat"}
    assert all(t.task == name for name, t in tasks.items())
    with pytest.raises(ValueError, match="not in this bundle"):
        TextToMediaPipeline(bundle, "image")


@pytest.mark.slow
def test_tiny_end_to_end_deepspeed_training_learns_caption_to_media(tmp_path) -> None:
    """Bundle → corpus shards → a few DeepSpeed steps → the loss falls and the trained
    model, put back into the bundle, draws the grey level its caption names."""
    from tessera.llm.model import TesseraLM
    from tessera.llm.train import TrainConfig, train
    from tessera.pipelines.corpus import CorpusConfig, tokenize_corpus

    register_doubles()
    b = tiny_bundle(plugins={"double_grid": GridDouble.debug()})
    levels = ("black", "white")
    sources = {"double_grid": lambda p, s: (torch.full((3, 4, 4), float(s % 2)), f"{levels[s % 2]} square")}
    config = CorpusConfig(heldout=8, cfg_dropout=0.0)
    tokenize_corpus(b, 160, tmp_path / "train", config=config, sources=sources, progress=False)
    b.model.save_pretrained(tmp_path / "init", manifest_hash=b.vocab.manifest_hash)
    result = train(TrainConfig.debug(data=str(tmp_path / "train"), out_dir=str(tmp_path / "run"),
                                     init_from=str(tmp_path / "init"), max_steps=30, lr=1e-2, min_lr=1e-3,
                                     warmup_steps=4, seq_len=128))
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert first > 4.0 and result["final_loss"] < 1.0, (first, result["final_loss"])
    b.model = TesseraLM.from_pretrained(result["model_dir"], expected_manifest=b.vocab.manifest()).eval()
    b.settings["meta"]["double_grid"] = {"height": 2, "width": 2}
    greedy = {"text": SamplingConfig(temperature=0.0), "double_grid": SamplingConfig(temperature=0.0)}
    draw = TextToMediaPipeline(b, "double_grid")
    dark, light = draw(["black square", "white square"], sampling=greedy, cfg_scale=1.0)
    assert float(dark.mean()) < 0.2 and float(light.mean()) > 0.8


def test_eval_metrics_score_captions_and_transcripts() -> None:
    from tessera.modalities.world.visual import sample_image_scene, sample_video_scene
    from tessera.pipelines.evaluate import caption_attribute_accuracy, word_accuracy

    assert word_accuracy("a red circle", "a red circle") == 1.0
    assert word_accuracy("A red, circle!", "a red circle on the left") == pytest.approx(0.5)
    assert word_accuracy("a blue circle", "a red circle") == pytest.approx(2 / 3)
    assert word_accuracy("", "two words") == 0.0
    for seed in range(12):  # the ground-truth caption scores perfectly, under any template
        for scene in (sample_image_scene(seed), sample_video_scene(seed)):
            score = caption_attribute_accuracy(scene.caption, scene)
            assert score.pop("by_attribute") == dict.fromkeys(score_names(scene), 1.0)
            assert score == {"attributes": 1.0, "background": 1.0, "exact": 1.0}
    scene = next(s for s in map(sample_image_scene, range(100)) if len(s.attributes) == 2
                 and s.attributes[0].colour != s.attributes[1].colour)
    obj = scene.attributes[0]
    wrong = scene.caption.replace(obj.colour, "green" if obj.colour != "green" else "red", 1)
    score = caption_attribute_accuracy(wrong, scene)
    assert score["attributes"] == pytest.approx(1 - 1 / 8) and score["exact"] == 0.0
    assert score["by_attribute"] == {"shape": 1.0, "colour": 0.5, "size": 1.0, "position": 1.0}
    from tessera.pipelines.evaluate import _expected_words

    only_second = "a " + " ".join(_expected_words(scene.attributes[1]).values())  # one clause, for object 2
    score = caption_attribute_accuracy(only_second, scene)
    assert score["attributes"] == pytest.approx(0.5) and set(score["by_attribute"].values()) == {0.5}
    nothing = caption_attribute_accuracy("nothing useful", scene)
    assert nothing["attributes"] == 0.0 and set(nothing["by_attribute"].values()) == {0.0}


def test_media_attribute_accuracy_counts_extra_objects_as_wrong_in_the_strict_figure() -> None:
    from tessera.modalities.world.visual import (
        render_image,
        render_video,
        sample_image_scene,
        sample_video_scene,
    )
    from tessera.pipelines.evaluate import media_attribute_accuracy

    two = next(s for s in map(sample_image_scene, range(100)) if len(s.attributes) == 2)
    image = render_image(two)
    right = media_attribute_accuracy(image, two)
    assert right["attribute_accuracy"] == right["strict_attribute_accuracy"] == 1.0 and right["all"] == 1.0
    one = dataclasses.replace(two, attributes=two.attributes[:1])  # the image shows an extra object
    extra = media_attribute_accuracy(image, one)
    assert extra["attribute_accuracy"] == 1.0 and extra["strict_attribute_accuracy"] == 0.5
    assert extra["by_attribute"]["count"] == 0.0 and extra["all"] == 0.0 and "objects" not in extra["by_attribute"]
    missing = media_attribute_accuracy(render_image(one), two)  # one object of two: half right, nothing extra
    assert missing["attribute_accuracy"] == missing["strict_attribute_accuracy"] == 0.5
    clip = sample_video_scene(3)
    scored = media_attribute_accuracy(render_video(clip, frames=8), clip)  # clips are read as tracks
    assert scored["strict_attribute_accuracy"] == scored["attribute_accuracy"] and "motion" in scored["by_attribute"]


def score_names(scene) -> list[str]:
    """The attribute names a scene's caption is scored on (motion adds some for clips)."""
    from tessera.pipelines.evaluate import _expected_words

    return list(dict.fromkeys(k for o in scene.attributes for k in _expected_words(o)))


def test_tiny_bundle_of_the_builtin_plugins_serves_every_task(tmp_path) -> None:
    b = tiny_bundle(tmp_path / "tiny")  # saved and loaded back, so every check of load_bundle runs
    tasks = tasks_for(b)
    assert {"text-to-image", "image-to-text", "text-to-speech", "speech-to-text", "chat"} <= set(tasks)
    rank = {"image": 3, "video": 4, "audio": 1}
    for name, plugin in b.tokenizers.items():
        media = tasks[f"text-to-{name}"]("a red circle on the left", max_new_tokens=80)
        assert media.ndim == rank[plugin.media_kind] and torch.isfinite(media).all()
        if plugin.media_kind in ("image", "video"):
            assert media.shape[-3] == 3
        assert isinstance(tasks[f"{name}-to-text"](media, max_new_tokens=6), str)
