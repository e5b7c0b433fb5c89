"""Task pipelines over a bundle: text→media, media→text for any modality, and any-to-any chat.

Every pipeline takes its components in the constructor (``Pipeline(bundle)``) and has one
``__call__`` with the same argument names (as in diffusers' pipelines): ``inputs`` (one
item or a list, a batch), ``seed``, ``sampling`` (per modality: ``{"text": ...,
"image": SamplingConfig(...)}`` on top of the bundle's defaults), ``cfg_scale`` (a number
or a dict per modality) and ``max_new_tokens``. The stages are labelled ``# 1. encode``,
``# 2. generate``, ``# 3. decode``.

Prompts are the instruction templates the built-in corpus trains with
(:func:`text_to_media_prompt`, :func:`media_to_text_prompt`), in chat form::

    text→M:  <bos><user> "Create an image: {caption}" <assistant><begin_M> meta...   → codes <end_M>
    M→text:  <bos><user> "Describe this image." <begin_M>..<end_M><assistant>        → caption <eos>

A text→media prompt ends inside the span, with the meta tokens (grid height/width, clip
length) already written from the bundle's settings, so the span has the shape the
tokenizer was trained on. Classifier-free guidance (Ho & Salimans 2022; Parti/Make-A-Scene
for image tokens) contrasts each prompt with the same prompt without the caption text —
the corpus drops captions with a small probability to teach that unconditional case.
Decoding is constrained by the bundle's grammar, so every generated span decodes.

Text→media also takes ``best_of`` (default: the bundle's ``settings["best_of"][modality]``,
else 1): it samples that many spans per caption and keeps the one the same LLM, asked to
describe it exactly as in its media→text training documents, gives the caption the highest
log-likelihood — a reranker that needs no second model (DALL·E reranked with CLIP; here the
generator's own captioning direction scores). Only the kept spans are decoded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.document import Document, MediaSegment, TextSegment
from ..core.spec import ModalityPlugin
from ..llm.generate import SamplingConfig, generate
from .bundle import Bundle

__all__ = [
    "TextToMediaPipeline",
    "MediaToTextPipeline",
    "TextToImagePipeline",
    "ImageToTextPipeline",
    "TextToVideoPipeline",
    "VideoToTextPipeline",
    "TextToSpeechPipeline",
    "SpeechToTextPipeline",
    "ChatPipeline",
    "tasks_for",
    "text_to_media_prompt",
    "media_to_text_prompt",
    "instruction_texts",
    "NUM_TEMPLATES",
]

# ---- instruction templates (shared with the corpus) ------------------------------------------
_NOUNS = {"image": "an image", "video": "a video", "audio": "speech", "mesh": "a 3D model",
          "motion": "a motion", "actions": "an action sequence", "timeseries": "a signal"}
# text→media: the caption comes last, so the unconditional prompt is the template with "".
_TO_MEDIA = ("Create {noun}: {caption}", "Generate {noun} of this: {caption}", "Make {noun}. {caption}")
_TO_AUDIO = ("Say this: {caption}", "Speak the words: {caption}", "Read aloud: {caption}")
# media→text: the instruction comes before the media.
_FROM_MEDIA = ("Describe this {kind}.", "What does this {kind} show?", "Write a caption for this {kind}.")
_FROM_AUDIO = ("Transcribe this speech.", "What is said here?", "Write down these words.")
NUM_TEMPLATES = 3
"""Templates per direction; the corpus samples all of them, pipelines use template 0."""


def text_to_media_prompt(media_kind: str, caption: str, variant: int = 0) -> str:
    """The user turn asking for media of ``media_kind`` showing ``caption``."""
    if media_kind == "audio":
        return _TO_AUDIO[variant % NUM_TEMPLATES].format(caption=caption)
    noun = _NOUNS.get(media_kind, f"a {media_kind}")
    return _TO_MEDIA[variant % NUM_TEMPLATES].format(noun=noun, caption=caption)


def media_to_text_prompt(media_kind: str, variant: int = 0) -> str:
    """The user turn (before the media) asking for its caption or transcript."""
    if media_kind == "audio":
        return _FROM_AUDIO[variant % NUM_TEMPLATES]
    return _FROM_MEDIA[variant % NUM_TEMPLATES].format(kind=media_kind)


def instruction_texts(plugins: dict[str, ModalityPlugin]) -> list[str]:
    """Every instruction template for these plugins' media kinds (text-tokenizer training)."""
    kinds = sorted({p.media_kind for p in plugins.values()})
    return [f(kind, *args) for kind in kinds for v in range(NUM_TEMPLATES)
            for f, args in ((text_to_media_prompt, ("", v)), (media_to_text_prompt, (v,)))]


# ---- shared helpers ----------------------------------------------------------------------
def _as_batch(inputs: Any, what: str) -> tuple[list[Any], bool]:
    """(items, was_single): a list or tuple is a batch, anything else one item."""
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError(f"inputs is an empty list; give one {what} or a non-empty list of them")
        return list(inputs), False
    return [inputs], True


def _check_modality(bundle: Bundle, modality: str) -> ModalityPlugin:
    if modality not in bundle.tokenizers:
        raise ValueError(f"modality {modality!r} is not in this bundle (it has {list(bundle.tokenizers)}); "
                         f"add it with `tessera bundle add-modality` or pick one of those")
    return bundle.tokenizers[modality]


def _device(bundle: Bundle) -> torch.device:
    return next(bundle.model.parameters()).device


def _room(bundle: Bundle, prompts: Sequence[Tensor], uncond: Sequence[Tensor] | None) -> int:
    longest = max(p.numel() for p in [*prompts, *(uncond or [])])
    room = bundle.model.config.max_seq_len - longest
    if room < 1:
        raise ValueError(f"the prompt is {longest} tokens, the model's context is {bundle.model.config.max_seq_len}; "
                         f"shorten the prompt")
    return room


def _user_ids(bundle: Bundle, segments: list[Any]) -> Tensor:
    ids, _ = Document(segments).to_ids(bundle.vocab, bundle.text, bundle.tokenizers, add_eos=False)
    return ids


def _text_of(bundle: Bundle, row: Tensor) -> str:
    """The text a generated row spells, up to ``<eos>`` or a role token; media spans are skipped."""
    v = bundle.vocab
    stops = {v.eos_id, v.pad_id, *v.role_ids.values()}
    kept = []
    for t in row.tolist():
        if t in stops:
            break
        if t < v.text_size:
            kept.append(t)
    return bundle.text.decode(kept)


def _read(plugin: ModalityPlugin, item: Any) -> Any:
    """A path is read with the plugin; anything else is taken as canonical media."""
    if isinstance(item, (str, os.PathLike)):
        if not os.path.isfile(item):
            raise ValueError(f"{item}: no such file; give a path to a {plugin.media_kind} file "
                             f"({', '.join(plugin.file_extensions)}) or the media itself")
        return plugin.read(str(item))
    return item


# ---- text → media ------------------------------------------------------------------------
class TextToMediaPipeline:
    """Caption(s) → media of one modality: one decoded media item per caption."""

    def __init__(self, bundle: Bundle, modality: str) -> None:
        self.bundle = bundle
        self.modality = modality
        self.plugin = _check_modality(bundle, modality)
        self.layout = bundle.vocab.spec(modality).layout

    @property
    def task(self) -> str:
        return f"text-to-{self.modality}"

    def _meta_ids(self) -> Tensor:
        """The span's meta tokens (the shape to generate) from the bundle's settings."""
        values = self.bundle.settings.get("meta", {}).get(self.modality, {})
        missing = [m.name for m in self.layout.meta if m.name not in values]
        if missing:
            raise ValueError(f"the bundle's settings give no {missing} for {self.modality!r}; set "
                             f"settings['meta'][{self.modality!r}] (e.g. the grid of the tokenizer's training size)")
        local = [off + int(values[m.name]) - m.low for m, off in zip(self.layout.meta, self.layout.meta_offsets, strict=True)]
        return self.bundle.vocab.to_global(self.modality, torch.tensor(local, dtype=torch.long))

    def _prompt(self, caption: str) -> Tensor:
        v = self.bundle.vocab
        user = _user_ids(self.bundle, [TextSegment(text_to_media_prompt(self.plugin.media_kind, caption), "user")])
        opening = torch.tensor([v.role_ids["assistant"], v.begin_id(self.modality)])
        return torch.cat([user, opening, self._meta_ids()])

    def _limit(self, max_new_tokens: int | None, room: int) -> int:
        """Tokens to generate: the rest of the span and its end token."""
        n_meta = len(self.layout.meta)
        steps = self.layout.steps_for(self.bundle.settings.get("meta", {}).get(self.modality))
        if steps is None:  # variable length: up to the settings' media limit
            need = min(self.layout.max_span_tokens - n_meta + 1,
                       self.bundle.settings["limits"].get("max_media_tokens", 1 << 30))
            if max_new_tokens is not None and max_new_tokens < self.layout.num_levels + 1:
                raise ValueError(f"max_new_tokens={max_new_tokens} cannot hold one {self.modality} step "
                                 f"({self.layout.num_levels} tokens) and the end token; raise it")
            return min(max_new_tokens or need, need, room)
        need = steps * self.layout.num_levels + 1
        if (max_new_tokens is not None and max_new_tokens < need) or room < need:
            raise ValueError(f"a {self.modality} span here is {need} tokens, but max_new_tokens={max_new_tokens} and the "
                             f"model has room for {room}; raise max_new_tokens or use a model with a longer context")
        return need

    def _span(self, row: Tensor) -> Tensor:
        """Local ids of the generated span (meta + codes), cut to whole steps if it was not closed."""
        v = self.bundle.vocab
        hits = (row == v.end_id(self.modality)).nonzero()
        codes = row[: int(hits[0])] if hits.numel() else row[: row.numel() // self.layout.num_levels * self.layout.num_levels]
        return torch.cat([v.to_local(self.modality, self._meta_ids()), v.to_local(self.modality, codes.cpu())])

    def resolve_best_of(self, best_of: int | None = None) -> int:
        """How many spans a call draws per caption: ``best_of``, or the bundle's setting for
        this modality when None (1 if it has none); a value that is not an integer >= 1 is
        refused, naming where it came from."""
        k = self.bundle.settings.get("best_of", {}).get(self.modality, 1) if best_of is None else best_of
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            where = "best_of" if best_of is not None else f"the bundle's settings['best_of'][{self.modality!r}]"
            raise ValueError(f"{where}={k!r} must be an integer >= 1 (1 keeps the one sample; e.g. 4 samples four "
                             f"{self.modality} spans per caption and keeps the one the model captions best)")
        return k

    @torch.inference_mode()
    def caption_log_likelihood(self, spans: Sequence[Tensor], captions: Sequence[str], *,
                               batch_size: int = 8) -> Tensor:
        """log p(caption | span) under the bundle's LLM for each (local span, caption) pair:
        the media→text document the corpus trains on (the instruction, the span, the caption
        as the assistant's turn), summed over the caption's tokens and its end. (N,) float."""
        b, v = self.bundle, self.bundle.vocab
        model = b.model
        out = []
        for i in range(0, len(spans), batch_size):
            rows, masks = [], []
            for local, caption in zip(spans[i : i + batch_size], captions[i : i + batch_size], strict=True):
                doc = Document([TextSegment(media_to_text_prompt(self.plugin.media_kind), "user"),
                                MediaSegment(self.modality, ids=local, role="user"), TextSegment(caption, "assistant")])
                ids, mask = doc.to_ids(v, b.text, b.tokenizers, train_on="assistant")
                rows.append(torch.as_tensor(ids, dtype=torch.long))
                masks.append(torch.as_tensor(mask, dtype=torch.float32))
            length = max(len(r) for r in rows)
            ids = torch.stack([torch.nn.functional.pad(r, (0, length - len(r)), value=v.pad_id) for r in rows])
            mask = torch.stack([torch.nn.functional.pad(m, (0, length - len(m))) for m in masks])
            ids, mask = ids.to(_device(b)), mask.to(_device(b))
            nll = torch.nn.functional.cross_entropy(model(ids)[:, :-1].float().transpose(1, 2), ids[:, 1:],
                                                    reduction="none")  # (n, L-1), as train.token_losses
            out.append(-(nll * mask[:, 1:]).sum(1).cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def __call__(self, inputs: str | Sequence[str], *, seed: int = 0,
                 sampling: dict[str, SamplingConfig] | None = None, cfg_scale: float | dict[str, float] | None = None,
                 max_new_tokens: int | None = None, best_of: int | None = None) -> Any:
        captions, single = _as_batch(inputs, "caption")
        bad = [c for c in captions if not isinstance(c, str)]
        if bad:
            raise ValueError(f"{self.task} takes captions (str), got {type(bad[0]).__name__}")
        b, v = self.bundle, self.bundle.vocab
        k = self.resolve_best_of(best_of)
        # 1. encode: the caption prompts (best_of rows each), and the caption-free prompts for guidance
        prompts = [self._prompt(c) for c in captions for _ in range(k)]
        scales = b.cfg_scales(cfg_scale)
        guided = scales[self.modality] != 1.0
        uncond = [self._prompt("") for _ in prompts] if guided else None
        # 2. generate inside the span, stopping at its end token; keep the best of each caption's k
        out = generate(b.model, [p.to(_device(b)) for p in prompts], max_new_tokens=self._limit(max_new_tokens, _room(b, prompts, uncond)),
                       sampling=b.sampling(sampling), grammar=b.grammar, cfg_scale=scales if guided else 1.0,
                       uncond_prompts=[u.to(_device(b)) for u in uncond] if guided else None,
                       eos_id=v.end_id(self.modality), pad_id=v.pad_id, seed=seed, compile=b.compile)
        spans = [self._span(row.cpu()) for row in out]
        if k > 1:  # an empty caption (unconditional generation) has nothing to score: its first sample is kept
            scored = [i for i, c in enumerate(captions) if c.strip()]
            scores = torch.zeros(len(captions), k)
            if scored:
                scores[scored] = self.caption_log_likelihood(
                    [spans[i * k + j] for i in scored for j in range(k)],
                    [captions[i] for i in scored for _ in range(k)]).view(len(scored), k)
            spans = [spans[i * k + int(j)] for i, j in enumerate(scores.argmax(1))]
        # 3. decode every kept span with the modality's tokenizer
        media = [self.plugin.decode(span) for span in spans]
        return media[0] if single else media


class MediaToTextPipeline:
    """Media (canonical media or file paths) of one modality → caption/transcript text."""

    def __init__(self, bundle: Bundle, modality: str) -> None:
        self.bundle = bundle
        self.modality = modality
        self.plugin = _check_modality(bundle, modality)

    @property
    def task(self) -> str:
        return f"{self.modality}-to-text"

    def _prompt(self, local: Tensor | None) -> Tensor:
        v = self.bundle.vocab
        segments: list[Any] = [TextSegment(media_to_text_prompt(self.plugin.media_kind), "user")]
        if local is not None:
            segments.append(MediaSegment(self.modality, ids=local, role="user"))
        return torch.cat([_user_ids(self.bundle, segments), torch.tensor([v.role_ids["assistant"]])])

    @torch.inference_mode()
    def __call__(self, inputs: Any, *, seed: int = 0, sampling: dict[str, SamplingConfig] | None = None,
                 cfg_scale: float | dict[str, float] | None = None, max_new_tokens: int | None = None) -> str | list[str]:
        items, single = _as_batch(inputs, f"{self.plugin.media_kind} (or a path)")
        b, v = self.bundle, self.bundle.vocab
        # 1. encode the media with the modality's tokenizer, inside the instruction
        prompts = [self._prompt(torch.as_tensor(self.plugin.encode(_read(self.plugin, x)))) for x in items]
        scales = b.cfg_scales({"text": cfg_scale} if isinstance(cfg_scale, (int, float)) else cfg_scale)
        guided = scales["text"] != 1.0
        uncond = [self._prompt(None) for _ in items] if guided else None  # the instruction without the media
        # 2. generate text until <eos>
        limit = min(max_new_tokens or b.settings["limits"]["max_text_tokens"], _room(b, prompts, uncond))
        out = generate(b.model, [p.to(_device(b)) for p in prompts], max_new_tokens=limit, sampling=b.sampling(sampling),
                       grammar=b.grammar, cfg_scale=scales if guided else 1.0,
                       uncond_prompts=[u.to(_device(b)) for u in uncond] if guided else None,
                       eos_id=v.eos_id, pad_id=v.pad_id, seed=seed, compile=b.compile)
        # 3. decode the text ids
        texts = [_text_of(b, row.cpu()).strip() for row in out]
        return texts[0] if single else texts


class TextToImagePipeline(TextToMediaPipeline):
    def __init__(self, bundle: Bundle) -> None:
        super().__init__(bundle, "image")


class ImageToTextPipeline(MediaToTextPipeline):
    def __init__(self, bundle: Bundle) -> None:
        super().__init__(bundle, "image")


class TextToVideoPipeline(TextToMediaPipeline):
    def __init__(self, bundle: Bundle) -> None:
        super().__init__(bundle, "video")


class VideoToTextPipeline(MediaToTextPipeline):
    def __init__(self, bundle: Bundle) -> None:
        super().__init__(bundle, "video")


class TextToSpeechPipeline(TextToMediaPipeline):
    def __init__(self, bundle: Bundle) -> None:
        super().__init__(bundle, "speech")


class SpeechToTextPipeline(MediaToTextPipeline):
    def __init__(self, bundle: Bundle) -> None:
        super().__init__(bundle, "speech")


# ---- any-to-any chat -------------------------------------------------------------------------
class ChatPipeline:
    """Chat messages with content parts → the assistant's reply as content parts.

    A message is ``{"role": "user", "content": "text" | [parts]}``; a part is
    ``{"type": "text", "text": ...}`` or a media part ``{"type": MODALITY, "media": ...}``
    (canonical media), ``{"type": MODALITY, "path": ...}`` or ``{"type": MODALITY, "ids": [...]}``.
    The reply is a list of ``{"type": "text", "text": ...}`` and
    ``{"type": MODALITY, "media": decoded, "ids": [local ids]}`` parts. A media span the
    length limit cut short is dropped (variable-length spans keep their whole steps).
    """

    task = "chat"

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    def _segments(self, messages: Any, *, drop_last_user_text: bool = False) -> list[Any]:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        last_user = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"), default=-1)
        segments: list[Any] = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {msg!r:.80}")
            role, content = msg["role"], msg["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise ValueError(f"message {i} ({role}): content is a {type(content).__name__}; give a str or a list of parts")
            for j, part in enumerate(parts):
                where = f"message {i} ({role}) part {j}"
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ValueError(f"{where}: a part is a dict with a 'type', got {part!r:.80}")
                if part["type"] == "text":
                    if not (drop_last_user_text and i == last_user):
                        segments.append(TextSegment(str(part.get("text", "")), role))
                    continue
                name = part["type"]
                plugin = _check_modality(self.bundle, name)
                if part.get("media") is not None:
                    segments.append(MediaSegment(name, media=part["media"], role=role))
                elif part.get("path") is not None:
                    segments.append(MediaSegment(name, media=_read(plugin, part["path"]), role=role))
                elif part.get("ids") is not None:
                    segments.append(MediaSegment(name, ids=torch.as_tensor(part["ids"], dtype=torch.long), role=role))
                else:
                    raise ValueError(f"{where} ({name}): give 'media', 'path' or 'ids'")
        if not segments:
            segments.append(TextSegment("", messages[0]["role"]))
        return segments

    def _prompt(self, segments: list[Any]) -> Tensor:
        v = self.bundle.vocab
        ids = _user_ids(self.bundle, segments)
        if segments[-1].role == "assistant":
            return ids
        return torch.cat([ids, torch.tensor([v.role_ids["assistant"]])])

    def _parts(self, row: Tensor) -> list[dict[str, Any]]:
        """Generated ids → content parts (text, and decoded media with their local ids)."""
        b, v = self.bundle, self.bundle.vocab
        row = row.tolist()
        if v.eos_id in row:
            row = row[: row.index(v.eos_id)]
        begins = {v.begin_id(m): m for m in v.modalities}
        open_at = None
        for i, t in enumerate(row):  # find a span left open by the length limit
            if t in begins:
                open_at = i
            elif open_at is not None and t == v.end_id(begins[row[open_at]]):
                open_at = None
        if open_at is not None:
            name = begins[row[open_at]]
            layout = v.spec(name).layout
            body = row[open_at + 1:]
            n_meta = len(layout.meta)
            whole = (len(body) - n_meta) // layout.num_levels * layout.num_levels
            row = row[:open_at] + ([row[open_at], *body[: n_meta + whole], v.end_id(name)]
                                   if layout.kind == "variable" and whole > 0 else [])
        parts: list[dict[str, Any]] = []
        for seg in Document.from_ids(torch.tensor(row, dtype=torch.long), v, b.text).segments:
            if isinstance(seg, TextSegment):
                if seg.text:
                    parts.append({"type": "text", "text": seg.text})
            else:
                parts.append({"type": seg.modality, "media": b.tokenizers[seg.modality].decode(seg.ids),
                              "ids": seg.ids.tolist()})
        return parts

    @torch.inference_mode()
    def __call__(self, inputs: list[dict[str, Any]], *, seed: int = 0, sampling: dict[str, SamplingConfig] | None = None,
                 cfg_scale: float | dict[str, float] | None = None, max_new_tokens: int | None = None) -> list[dict[str, Any]]:
        b, v = self.bundle, self.bundle.vocab
        # 1. encode the conversation (media parts through their tokenizers), open the assistant turn
        prompt = self._prompt(self._segments(inputs))
        scales = b.cfg_scales(cfg_scale)
        guided = any(s != 1.0 for s in scales.values())
        uncond = [self._prompt(self._segments(inputs, drop_last_user_text=True))] if guided else None
        # 2. generate until <eos> (or the length limit)
        limit = min(max_new_tokens or b.model.config.max_seq_len, _room(b, [prompt], uncond))
        out = generate(b.model, [prompt.to(_device(b))], max_new_tokens=limit, sampling=b.sampling(sampling),
                       grammar=b.grammar, cfg_scale=scales if guided else 1.0,
                       uncond_prompts=[u.to(_device(b)) for u in uncond] if guided else None,
                       eos_id=v.eos_id, pad_id=v.pad_id, seed=seed, compile=b.compile)
        # 3. decode: text and media parts
        return self._parts(out[0].cpu())


def tasks_for(bundle: Bundle) -> dict[str, Callable[..., Any]]:
    """Every task the bundle can run: ``text-to-M`` and ``M-to-text`` for each of its
    modalities (a new plugin gets its tasks without code changes), and ``chat``."""
    tasks: dict[str, Callable[..., Any]] = {}
    for name in bundle.tokenizers:
        tasks[f"text-to-{name}"] = TextToMediaPipeline(bundle, name)
        tasks[f"{name}-to-text"] = MediaToTextPipeline(bundle, name)
    tasks["chat"] = ChatPipeline(bundle)
    return tasks
