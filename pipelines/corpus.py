"""The built-in multimodal corpus: the built-in visual and spoken worlds as training documents.

Every sample of the built-in worlds comes from a seed and carries its caption
(:mod:`tessera.modalities.world.visual` for images and clips, :mod:`tessera.modalities.speech.synth`
for spoken captions), so the corpus is a pure function of its config: document ``i`` of a
split is always the same. Documents, for each modality with a source:

* **text → media** (chat): ``user: "Create an image: {caption}"`` → ``assistant: <image>``;
  with probability ``cfg_dropout`` the caption is left out, which teaches the
  unconditional prompt classifier-free guidance contrasts with;
* **media → text** (chat): ``user: "Describe this image." <image>`` → ``assistant: {caption}``
  (for speech: ``"Transcribe this speech."`` → the transcript);
* **interleaved** (no roles, every token trained): caption then media, or media then
  caption; an image scene whose caption is also spoken gets image, speech and text together.

The instruction templates are :mod:`.tasks`'s, so the task pipelines prompt exactly as
the model was trained. Splits are seed ranges: ``"heldout"`` draws scenes ``[0, heldout)``,
``"train"`` scenes from ``heldout`` on, so no evaluated scene is ever trained on.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.document import Document, MediaSegment, TextSegment
from ..core.spec import ModalityPlugin
from ..llm.data import write_token_shards
from .bundle import Bundle
from .tasks import NUM_TEMPLATES, media_to_text_prompt, text_to_media_prompt

__all__ = ["CorpusConfig", "Source", "builtin_sources", "documents", "task_document", "scene_seed", "corpus_texts",
           "tokenize_corpus", "train_on_for", "TASKS", "SPLITS"]

TASKS = ("text-to-media", "media-to-text", "interleaved")
SPLITS = ("train", "heldout")

Source = Callable[[ModalityPlugin, int], tuple[Any, str]]
"""(plugin, scene seed) → (canonical media, its caption)."""


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    """How the corpus mixes tasks and splits (JSON-serialisable)."""

    heldout: int = 1000  # scenes [0, heldout) are held out for evaluation
    cfg_dropout: float = 0.1  # text→media documents without their caption
    mix: dict[str, float] = field(default_factory=lambda: {"text-to-media": 0.4, "media-to-text": 0.4, "interleaved": 0.2})
    # optional: how often each modality is drawn (default: in turn), and per-modality task mixes
    modality_mix: dict[str, float] | None = None
    task_mix: dict[str, dict[str, float]] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.heldout < 1:
            raise ValueError(f"heldout={self.heldout}: hold out at least one scene (e.g. 1000)")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout={self.cfg_dropout} must be in [0, 1), e.g. 0.1")
        for where, mix in [("mix", self.mix), *((f"task_mix[{m!r}]", v) for m, v in self.task_mix.items())]:
            unknown = sorted(set(mix) - set(TASKS))
            if unknown or not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
                raise ValueError(f"{where}={mix}: give non-negative weights for some of {TASKS}, not all zero")
        if self.modality_mix is not None and (not self.modality_mix or any(w < 0 for w in self.modality_mix.values())
                                              or sum(self.modality_mix.values()) <= 0):
            raise ValueError(f"modality_mix={self.modality_mix}: give non-negative weights per modality, not all zero "
                             f"(or None to take the modalities in turn)")

    @classmethod
    def debug(cls) -> CorpusConfig:
        return cls(heldout=16)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CorpusConfig:
        return cls(**d)


# ---- sources -------------------------------------------------------------------------------
def _image_source(plugin: ModalityPlugin, seed: int) -> tuple[Any, str]:
    from ..modalities.world.visual import sample_image_scene

    return plugin.example(seed), sample_image_scene(seed).caption


def _video_source(plugin: ModalityPlugin, seed: int) -> tuple[Any, str]:
    from ..modalities.world.visual import sample_video_scene

    return plugin.example(seed), sample_video_scene(seed).caption


def _speech_source(plugin: ModalityPlugin, seed: int) -> tuple[Any, str]:
    from ..modalities.speech.synth import caption_for_seed

    return plugin.example(seed), caption_for_seed(seed)


def builtin_sources() -> dict[str, Source]:
    """The built-in worlds by modality name: images and clips of coloured shapes, spoken captions."""
    return {"image": _image_source, "video": _video_source, "speech": _speech_source}


def scene_seed(split: str, i: int, config: CorpusConfig) -> int:
    """The scene seed of sample ``i`` of ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {SPLITS}")
    if split == "heldout":
        if not 0 <= i < config.heldout:
            raise ValueError(f"held-out sample {i} is outside the {config.heldout} held-out scenes; "
                             f"ask for fewer or raise CorpusConfig.heldout")
        return i
    return config.heldout + i


# ---- documents -------------------------------------------------------------------------------
def task_document(task: str, name: str, media_kind: str, media: Any, caption: str, *, variant: int = 0) -> Document:
    """One document of ``task`` (see :data:`TASKS`) for a media item and its caption;
    ``variant`` picks the instruction template (interleaved: 0 caption first, 1 media first)."""
    if task == "text-to-media":
        return Document([TextSegment(text_to_media_prompt(media_kind, caption, variant), "user"),
                         MediaSegment(name, media=media, role="assistant")])
    if task == "media-to-text":
        return Document([TextSegment(media_to_text_prompt(media_kind, variant), "user"),
                         MediaSegment(name, media=media, role="user"), TextSegment(caption, "assistant")])
    if task == "interleaved":
        segments = [TextSegment(caption), MediaSegment(name, media=media)]
        return Document(segments if variant % 2 == 0 else segments[::-1])
    raise ValueError(f"task={task!r}; use one of {TASKS}")


def _document(task: str, name: str, plugin: ModalityPlugin, media: Any, caption: str, rng: random.Random,
              config: CorpusConfig, extra: tuple[str, Any] | None) -> Document:
    variant = rng.randrange(NUM_TEMPLATES)
    if task == "text-to-media" and rng.random() < config.cfg_dropout:
        caption = ""
    if task == "interleaved" and extra is not None:  # the scene, its spoken caption, its text
        return Document([MediaSegment(name, media=media), MediaSegment(extra[0], media=extra[1]), TextSegment(caption)])
    return task_document(task, name, plugin.media_kind, media, caption, variant=variant)


def documents(plugins: dict[str, ModalityPlugin], *, n: int, split: str = "train",
              config: CorpusConfig | None = None, sources: dict[str, Source] | None = None,
              start: int = 0) -> Iterator[Document]:
    """Documents ``start .. start + n - 1`` of ``split``'s stream: modalities in turn (those with
    a source) or drawn from ``config.modality_mix``, each going through the split's scenes in
    order; a task drawn from ``config.mix``. ``start`` extends a corpus with documents (and
    scenes) it does not have yet: ``documents(n=a)`` then ``documents(n=b, start=a)`` are
    ``documents(n=a + b)``; the first ``start`` documents are only counted, never rendered."""
    config = config or CorpusConfig()
    if n < 0 or start < 0:
        raise ValueError(f"n={n}, start={start}: both must be >= 0")
    sources = builtin_sources() if sources is None else sources
    names = [m for m in plugins if m in sources]
    if not names:
        raise ValueError(f"no built-in source for any of the modalities {list(plugins)}; the corpus has sources for "
                         f"{sorted(sources)} (pass sources={{name: fn(plugin, seed) -> (media, caption)}})")
    if config.modality_mix is not None:
        missing = sorted(set(names) - set(config.modality_mix))
        if missing:
            raise ValueError(f"modality_mix={config.modality_mix} has no weight for {missing}; give every modality "
                             f"of the corpus a weight (0 leaves it out)")
    drawn = {m: 0 for m in names}  # scenes used so far per modality: each document gets the next scene
    for i in range(start + n):
        rng = random.Random(f"tessera-corpus-{config.seed}-{split}-{i}")
        if config.modality_mix is None:
            name = names[i % len(names)]
        else:
            name = rng.choices(names, [config.modality_mix[m] for m in names])[0]
        drawn[name] += 1
        if i < start:
            continue
        seed = scene_seed(split, drawn[name] - 1, config)
        media, caption = sources[name](plugins[name], seed)
        tasks, weights = zip(*config.task_mix.get(name, config.mix).items(), strict=True)
        task = rng.choices(tasks, weights)[0]
        extra = None
        spoken = [m for m in names if plugins[m].media_kind == "audio" and m != name]
        if task == "interleaved" and name == "image" and seed % 2 == 0 and spoken:
            extra = (spoken[0], sources[spoken[0]](plugins[spoken[0]], seed)[0])  # even seeds speak image captions
        yield _document(task, name, plugins[name], media, caption, rng, config, extra)


def train_on_for(doc: Document) -> str:
    """Chat documents train on the assistant's turn; interleaved ones on every token."""
    return "assistant" if any(seg.role is not None for seg in doc.segments) else "all"


def corpus_texts(n: int, *, config: CorpusConfig | None = None) -> list[str]:
    """Captions of ``n`` training scenes of each built-in world (text-tokenizer training)."""
    from ..modalities.world.visual import sample_image_scene, sample_video_scene

    config = config or CorpusConfig()
    seeds = [scene_seed("train", i, config) for i in range(n)]
    return [sample_image_scene(s).caption for s in seeds] + [sample_video_scene(s).caption for s in seeds]


def tokenize_corpus(bundle: Bundle, n: int, out_dir: str | os.PathLike, *, split: str = "train",
                    config: CorpusConfig | None = None, sources: dict[str, Source] | None = None,
                    shard_size: int = 1000, progress: bool = True, start: int = 0) -> dict[str, Any]:
    """Encode corpus documents ``start .. start + n - 1`` (:func:`documents`) with the bundle's
    tokenizers and write token shards (llm/data.py) to ``out_dir``; returns the shards' index
    (documents, tokens, shards)."""
    from tqdm import tqdm

    from ..core.checkpoint import load_json
    from ..llm.data import INDEX_NAME

    manifest = bundle.vocab.manifest()

    def encoded() -> Iterator[dict[str, Any]]:
        docs = documents(bundle.tokenizers, n=n, split=split, config=config, sources=sources, start=start)
        for doc in tqdm(docs, total=n, desc=f"tokenize {split}", disable=not progress):
            ids, mask = doc.to_ids(bundle.vocab, bundle.text, bundle.tokenizers, train_on=train_on_for(doc))
            yield {"ids": ids, "loss_mask": mask}

    write_token_shards(encoded(), out_dir, manifest["hash"], shard_size, manifest=manifest)
    return load_json(Path(out_dir) / INDEX_NAME)
