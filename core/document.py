"""Interleaved multimodal documents: text and media segments <-> global ids + loss mask.

A :class:`Document` is a list of segments, each a :class:`TextSegment` or one media
item (:class:`MediaSegment`: a file ``path``, in-memory ``media`` or precomputed local
``ids`` of a modality). It reads and writes the two JSON shapes people already use:

* chat content parts::

      {"messages": [{"role": "user", "content": [{"type": "text", "text": "draw a red circle"}]},
                    {"role": "assistant", "content": [{"type": "image", "path": "circle.png"}]}]}

  (``content`` may also be a plain string; a media part is ``{"type": NAME, "path": ...}``
  or ``{"type": NAME, "ids": [local ids]}`` where ``NAME`` is the modality);
* plain interleaved lists: ``["a caption", {"type": "image", "path": "cat.png"}]``.

In ids (see :mod:`tessera.core.vocab` and :mod:`tessera.core.grammar`) a document is::

    <|bos|> [<|ROLE|> at each change of role] text ids | <|begin_M|> codes <|end_M|> ... <|eos|>

and the loss mask says which of those tokens are training targets (``train_on``).
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from .checkpoint import load_json, save_json
from .grammar import Grammar
from .spec import LayoutError, ModalityPlugin
from .vocab import ROLES, UnifiedVocab

__all__ = ["TextSegment", "MediaSegment", "Segment", "Document", "TextTokenizerLike", "TrainOn"]


class TextTokenizerLike(Protocol):
    """What documents need from the text tokenizer (:class:`tessera.core.text.TextTokenizer`)."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class TextSegment:
    text: str
    role: str | None = None


@dataclass(eq=False)
class MediaSegment:
    """One media item of modality ``modality``. Give ``path`` (a file the plugin reads),
    ``media`` (what the plugin's ``encode`` takes) or ``ids`` (1-D local ids, used as
    they are); when several are set, ``ids`` win over ``media`` over ``path``."""

    modality: str
    path: str | os.PathLike | None = None
    media: Any = None
    ids: Tensor | None = None
    role: str | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MediaSegment):
            return NotImplemented
        same_ids = (self.ids is None and other.ids is None) or (
            self.ids is not None
            and other.ids is not None
            and torch.equal(torch.as_tensor(self.ids), torch.as_tensor(other.ids))
        )
        return (
            (self.modality, self.path, self.role) == (other.modality, other.path, other.role)
            and self.media is other.media
            and same_ids
        )


Segment = TextSegment | MediaSegment
TrainOn = str | Callable[[int, Segment], bool]


def _label(i: int, seg: Any) -> str:
    kind = seg.modality if isinstance(seg, MediaSegment) else "text"
    role = getattr(seg, "role", None)
    return f"segment {i} ({f'{role}, ' if role else ''}{kind})"


@functools.lru_cache(maxsize=8)
def _grammar(vocab: UnifiedVocab) -> Grammar:
    return Grammar(vocab)


@dataclass
class Document:
    """A list of text and media segments. Roles (``"system"``, ``"user"``,
    ``"assistant"``) are optional; segments without a role may only open a document
    that has roles later (a preamble)."""

    segments: list[Segment] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.segments = list(self.segments)
        self.check()

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    def __len__(self) -> int:
        return len(self.segments)

    def check(self) -> None:
        """Raise ``ValueError`` naming the first malformed segment."""
        first_role: int | None = None
        for i, seg in enumerate(self.segments):
            if not isinstance(seg, (TextSegment, MediaSegment)):
                raise ValueError(f"segment {i} is a {type(seg).__name__}; use TextSegment or MediaSegment")
            if isinstance(seg, MediaSegment) and not (
                isinstance(seg.modality, str) and seg.modality.isidentifier()
            ):
                raise ValueError(
                    f"segment {i}: modality={seg.modality!r}; give the modality's name, e.g. 'image'"
                )
            if seg.role is not None and seg.role not in ROLES:
                kind = seg.modality if isinstance(seg, MediaSegment) else "text"
                raise ValueError(
                    f"segment {i} ({kind}): role {seg.role!r} is not one of {', '.join(ROLES)}; fix the role"
                )
            label = _label(i, seg)
            if seg.role is not None and first_role is None:
                first_role = i
            if seg.role is None and first_role is not None:
                raise ValueError(
                    f"{label} has no role but segment {first_role} has role "
                    f"{self.segments[first_role].role!r}; give every segment after the first role a role"
                )
            if isinstance(seg, TextSegment) and not isinstance(seg.text, str):
                raise ValueError(f"{label}: text is a {type(seg.text).__name__}; pass a str")
            if isinstance(seg, MediaSegment) and seg.path is None and seg.media is None and seg.ids is None:
                raise ValueError(f"{label}: a media segment needs a path, media or ids; give one of them")

    # ---- JSON ----------------------------------------------------------------------
    @classmethod
    def from_json(cls, obj: Any, *, base_dir: str | os.PathLike | None = None) -> Document:
        """A chat (``{"messages": [...]}``) or a plain interleaved list. Relative media
        paths are resolved against ``base_dir`` when given."""
        if isinstance(obj, dict) and "messages" in obj:
            return cls._from_chat(obj["messages"], base_dir)
        if isinstance(obj, list):
            segments = [
                TextSegment(item) if isinstance(item, str) else _part(item, f"item {i}", None, base_dir)
                for i, item in enumerate(obj)
            ]
            return cls(segments)
        raise ValueError(
            f"a document is a dict with 'messages' (chat content parts) or a list of strings and "
            f"media parts, got {type(obj).__name__}"
            + (f" with keys {sorted(obj)}" if isinstance(obj, dict) else "")
        )

    @classmethod
    def _from_chat(cls, messages: Any, base_dir: str | os.PathLike | None) -> Document:
        if not isinstance(messages, list):
            raise ValueError(f"'messages' is a {type(messages).__name__}; it must be a list of messages")
        segments: list[Segment] = []
        for mi, msg in enumerate(messages):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise ValueError(f"message {mi} must be a dict with 'role' and 'content', got {msg!r:.80}")
            role = msg["role"]
            if role not in ROLES:
                raise ValueError(
                    f"message {mi}: role {role!r} is not one of {', '.join(ROLES)}; fix the role"
                )
            content = msg["content"]
            if isinstance(content, str):
                segments.append(TextSegment(content, role))
                continue
            if not isinstance(content, list):
                raise ValueError(
                    f"message {mi} ({role}): content is a {type(content).__name__}; give a string or a "
                    f"list of parts like {{'type': 'text', 'text': ...}}"
                )
            segments += [
                _part(part, f"message {mi} ({role}) part {pi}", role, base_dir)
                for pi, part in enumerate(content)
            ]
        return cls(segments)

    def to_json(self) -> dict[str, Any] | list[Any]:
        """The chat form when the segments have roles, else the plain list."""
        if any(seg.role is not None for seg in self.segments):
            messages: list[dict[str, Any]] = []
            for i, seg in enumerate(self.segments):
                if seg.role is None:
                    raise ValueError(
                        f"{_label(i, seg)} has no role; a chat gives every segment a role (or write a "
                        f"document without roles as a plain list)"
                    )
                if not messages or messages[-1]["role"] != seg.role:
                    messages.append({"role": seg.role, "content": []})
                messages[-1]["content"].append(_part_json(i, seg))
            return {"messages": messages}
        return [
            seg.text if isinstance(seg, TextSegment) else _part_json(i, seg)
            for i, seg in enumerate(self.segments)
        ]

    @classmethod
    def load(cls, path: str | os.PathLike) -> Document:
        """Read a JSON document; relative media paths resolve against its folder."""
        obj = load_json(path)  # names the file when it is missing or not JSON
        try:
            return cls.from_json(obj, base_dir=Path(path).parent)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def save(self, path: str | os.PathLike) -> None:
        save_json(path, self.to_json())

    # ---- ids -------------------------------------------------------------------------
    def to_ids(
        self,
        vocab: UnifiedVocab,
        text_tokenizer: TextTokenizerLike,
        tokenizers: Mapping[str, ModalityPlugin] | None = None,
        *,
        train_on: TrainOn = "all",
        add_bos: bool = True,
        add_eos: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Global ids ``(T,)`` and a loss mask ``(T,)`` (True: a training target).

        ``train_on``: ``"all"`` (every token but ``<|bos|>``), ``"assistant"`` (the
        assistant turns), a modality name (its spans, begin to end), or a function
        ``(index, segment) -> bool``. Except for ``"all"``, a role token or ``<|eos|>``
        that closes a trained segment is trained too, so the model learns where an
        answer ends; role tokens that open a turn are not.
        """
        self.check()
        trained = _train_rule(train_on, vocab)
        if text_tokenizer.vocab_size != vocab.text_size:
            raise ValueError(
                f"the text tokenizer has {text_tokenizer.vocab_size} ids but the vocabulary was built "
                f"for {vocab.text_size}; use the text tokenizer the vocabulary was built with"
            )
        pieces: list[Tensor] = []
        targets: list[bool] = []

        def put(ids: Tensor | list[int], target: bool) -> None:
            pieces.append(torch.as_tensor(ids, dtype=torch.long).reshape(-1))
            targets.append(target)

        if add_bos:
            put([vocab.bos_id], False)
        every = train_on == "all"
        segs = self.segments
        seg_trained = [every or trained(i, seg) for i, seg in enumerate(segs)]
        prev = False  # was the previous segment trained?
        i = 0
        while i < len(segs):
            seg = segs[i]
            if seg.role is not None and (i == 0 or segs[i - 1].role != seg.role):
                put([vocab.role_ids[seg.role]], every or prev)
            prev = seg_trained[i]
            if isinstance(seg, MediaSegment):
                local = _local_ids(i, seg, vocab, tokenizers)
                put([vocab.begin_id(seg.modality)], prev)
                put(vocab.to_global(seg.modality, local), prev)
                put([vocab.end_id(seg.modality)], prev)
                i += 1
                continue
            # adjacent text of one role and one loss flag is one text, encoded in one piece
            j = i + 1
            while j < len(segs) and _same_text_run(segs[j], seg_trained[j], seg.role, prev):
                j += 1
            joined = TextSegment("".join(s.text for s in segs[i:j]), seg.role)
            put(_text_ids(i, joined, vocab, text_tokenizer), prev)
            i = j
        if add_eos:
            put([vocab.eos_id], every or prev)
        if not pieces:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)
        ids = torch.cat(pieces)
        mask = torch.cat(
            [torch.full((p.numel(),), t, dtype=torch.bool) for p, t in zip(pieces, targets, strict=True)]
        )
        return ids, mask

    @classmethod
    def from_ids(
        cls, ids: Tensor | list[int], vocab: UnifiedVocab, text_tokenizer: TextTokenizerLike
    ) -> Document:
        """The document ``ids`` spell: text decoded, each media span a
        :class:`MediaSegment` holding its local ``ids`` (decode them with the plugin).
        ``ids`` must follow the grammar (:class:`~tessera.core.grammar.Grammar`); the
        error names the first position that does not."""
        ids = torch.as_tensor(ids)
        try:
            spans = _grammar(vocab).spans(ids)
        except ValueError as e:
            raise ValueError(f"ids do not form a Tessera document: {e}") from e
        flat = ids.long().tolist()
        role_of = {i: r for r, i in vocab.role_ids.items()}
        segments: list[Segment] = []
        role: str | None = None
        empty_turn = False  # a role token with nothing after it yet (e.g. a prompt's last token)
        text: list[int] = []

        def flush() -> None:
            nonlocal empty_turn
            if text or empty_turn:
                segments.append(TextSegment(text_tokenizer.decode(list(text)), role))
                text.clear()
                empty_turn = False

        pos = 0
        for span in [*spans, None]:
            stop = len(flat) if span is None else span.begin
            for tok in flat[pos:stop]:
                if tok in role_of:
                    flush()
                    role, empty_turn = role_of[tok], True
                elif tok < vocab.text_size:
                    text.append(tok)
                    empty_turn = False
                elif tok == vocab.eos_id:
                    break  # the grammar allows only padding after it
            if span is not None:
                empty_turn = False
                flush()
                local = vocab.to_local(span.modality, ids[span.begin + 1 : span.end].long())
                segments.append(MediaSegment(span.modality, ids=local, role=role))
                pos = span.end + 1
        flush()
        return cls(segments)


# ---- helpers ---------------------------------------------------------------------------
_MEDIA_KEYS = {"type", "path", "ids"}


def _part(part: Any, where: str, role: str | None, base_dir: str | os.PathLike | None) -> Segment:
    """One content part: ``{"type": "text", "text": ...}`` or a media part."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise ValueError(
            f"{where}: a part is a dict with a 'type' (\"text\" or a modality name), got {part!r:.80}"
        )
    name = part["type"]
    if name == "text":
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise ValueError(f"{where}: a text part is {{'type': 'text', 'text': str}}, got {part!r:.80}")
        return TextSegment(part["text"], role)
    if not name.isidentifier() or name != name.lower():
        raise ValueError(
            f'{where}: unknown part type {name!r}; use "text" or a modality name such as "image"'
        )
    extra = sorted(set(part) - _MEDIA_KEYS)
    if extra:
        raise ValueError(
            f"{where} ({name}): unknown key(s) {extra}; a media part has 'type' plus 'path' and/or 'ids'"
        )
    if "path" not in part and "ids" not in part:
        raise ValueError(f"{where} ({name}): give 'path' (a file) or 'ids' (local token ids)")
    path = part.get("path")
    if path is not None:
        if not isinstance(path, str):
            raise ValueError(f"{where} ({name}): path is a {type(path).__name__}; give a string")
        if base_dir is not None and not os.path.isabs(path):
            path = os.path.join(os.fspath(base_dir), path)
    ids = part.get("ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
            raise ValueError(f"{where} ({name}): ids must be a list of integer local ids, got {ids!r:.80}")
        ids = torch.tensor(ids, dtype=torch.long)
    return MediaSegment(name, path=path, ids=ids, role=role)


def _part_json(i: int, seg: Segment) -> dict[str, Any]:
    if isinstance(seg, TextSegment):
        return {"type": "text", "text": seg.text}
    if seg.path is None and seg.ids is None:
        raise ValueError(
            f"{_label(i, seg)} holds in-memory media only; write it to a file with the plugin's write() "
            f"and set path, or encode it and set ids"
        )
    part: dict[str, Any] = {"type": seg.modality}
    if seg.path is not None:
        part["path"] = os.fspath(seg.path)
    if seg.ids is not None:
        part["ids"] = torch.as_tensor(seg.ids).reshape(-1).tolist()
    return part


def _same_text_run(seg: Segment, trained: bool, role: str | None, run_trained: bool) -> bool:
    return isinstance(seg, TextSegment) and seg.role == role and trained == run_trained


def _train_rule(train_on: TrainOn, vocab: UnifiedVocab) -> Callable[[int, Segment], bool]:
    if callable(train_on):
        return lambda i, seg: bool(train_on(i, seg))
    if train_on == "all":
        return lambda i, seg: True
    if train_on == "assistant":
        return lambda i, seg: seg.role == "assistant"
    if isinstance(train_on, str) and train_on in vocab.modalities:
        return lambda i, seg: isinstance(seg, MediaSegment) and seg.modality == train_on
    raise ValueError(
        f"train_on={train_on!r}: use 'all', 'assistant', a modality of the vocabulary "
        f"({', '.join(vocab.modalities) or 'none'}) or a function (index, segment) -> bool"
    )


def _text_ids(i: int, seg: TextSegment, vocab: UnifiedVocab, text_tokenizer: TextTokenizerLike) -> Tensor:
    ids = torch.as_tensor(text_tokenizer.encode(seg.text), dtype=torch.long).reshape(-1)
    bad = (ids < 0) | (ids >= vocab.text_size)
    if bad.any():
        raise ValueError(
            f"{_label(i, seg)}: the text tokenizer returned id {int(ids[bad][0])}, outside the text range "
            f"[0, {vocab.text_size}); use the text tokenizer the vocabulary was built with"
        )
    return ids


def _local_ids(
    i: int, seg: MediaSegment, vocab: UnifiedVocab, tokenizers: Mapping[str, ModalityPlugin] | None
) -> Tensor:
    """The segment's local ids: its own ``ids``, else its media or file encoded by the
    plugin; checked against the modality's layout either way."""
    label, name = _label(i, seg), seg.modality
    if name not in vocab.modalities:
        close = difflib.get_close_matches(name, vocab.modalities, n=3, cutoff=0.8)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(
            f"{label}: modality {name!r} is not in the vocabulary{hint}; it has "
            f"{list(vocab.modalities)}. Fix the part type or add the modality with vocab.add_modality(spec)"
        )
    spec = vocab.spec(name)
    if seg.ids is not None:
        ids = torch.as_tensor(seg.ids)
        if ids.ndim != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(
                f"{label}: ids have shape {tuple(ids.shape)} and dtype {ids.dtype}; give 1-D integer "
                f"local ids as the {name} tokenizer's encode returns them"
            )
        source = "its ids"
    else:
        plugin = (tokenizers or {}).get(name)
        if plugin is None:
            raise ValueError(
                f"{label}: encoding its {'media' if seg.media is not None else 'file'} needs the {name} "
                f"tokenizer; pass tokenizers={{{name!r}: plugin}} or give precomputed ids"
            )
        if plugin.spec.fingerprint != spec.fingerprint:
            raise ValueError(
                f"{label}: the {name} tokenizer has fingerprint {plugin.spec.fingerprint[:12]} but the "
                f"vocabulary was built with {spec.fingerprint[:12]}; load the tokenizer the vocabulary "
                f"was built from"
            )
        media = seg.media
        if media is None and not os.path.isfile(seg.path):
            raise ValueError(
                f"{label}: file {os.fspath(seg.path)!r} not found; fix the path (relative paths in a JSON "
                f"document resolve against its folder)"
            )
        try:
            if seg.media is None:
                media = plugin.read(seg.path)
            ids = torch.as_tensor(plugin.encode(media))
        except ValueError as e:  # the plugin names the file or the problem; add the segment
            raise ValueError(f"{label}: {e}") from e
        source = f"the {name} tokenizer's output"
    try:
        spec.layout.unflatten(ids)
    except LayoutError as e:
        raise ValueError(
            f"{label}: {source} do not fit the {name} token layout: {e}. Re-encode the media with the "
            f"{name} tokenizer the vocabulary was built from"
        ) from e
    return ids.long()
