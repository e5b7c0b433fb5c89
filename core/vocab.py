"""The unified vocabulary: one id space for text, special tokens and every modality,
plus the JSON manifest that pins it down.

Global id layout (append-only: adding a modality appends a block, no id ever moves)::

    [0, text_size)                      sentencepiece text ids
    <|bos|> <|eos|> <|pad|> <|system|> <|user|> <|assistant|>
    for each modality, in the order it was added, one contiguous block:
        <|begin_NAME|> <|end_NAME|> NAME's extra special tokens
        NAME's local ids [0, layout.local_size)  (meta ids, level 0 codes, level 1 codes, ...)

The manifest is the JSON form of that layout (schema version, every range, every
special token, every plugin fingerprint) with a sha256 content hash. A model
checkpoint stores the hash it was trained with; :meth:`UnifiedVocab.check_compatible`
refuses another vocabulary and says what differs (:func:`diff_manifests`).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .checkpoint import load_json, save_json
from .spec import ModalitySpec

__all__ = [
    "SCHEMA_VERSION",
    "GLOBAL_SPECIALS",
    "ROLES",
    "UnifiedVocab",
    "ManifestMismatchError",
    "diff_manifests",
    "manifest_hash",
]

SCHEMA_VERSION = 1
ROLES = ("system", "user", "assistant")
GLOBAL_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>") + tuple(f"<|{r}|>" for r in ROLES)


class ManifestMismatchError(ValueError):
    """A vocabulary manifest is not the one that was expected (or is corrupt)."""


def manifest_hash(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, compact separators) of everything but ``"hash"``."""
    body = {k: v for k, v in manifest.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class _Block:
    """Where one modality lives in the global id space."""

    spec: ModalitySpec
    begin_id: int
    end_id: int
    special_ids: dict[str, int]
    start: int  # first global id of the local range
    stop: int  # one past the last


class UnifiedVocab:
    """Immutable global id space. Build with :meth:`build` or :meth:`from_manifest`;
    :meth:`add_modality` returns a new, larger vocabulary."""

    def __init__(self, text_size: int, *, text_sha256: str | None = None) -> None:
        if isinstance(text_size, bool) or not isinstance(text_size, int) or text_size < 1:
            raise ValueError(
                f"text_size={text_size!r}: the text vocabulary needs at least 1 id; pass "
                f"TextTokenizer.vocab_size"
            )
        if text_sha256 is not None and not isinstance(text_sha256, str):
            raise ValueError(f"text_sha256={text_sha256!r} must be a hex string or None (TextTokenizer.sha256)")
        self._text_size = text_size
        self._text_sha256 = text_sha256
        self._specials = {tok: text_size + i for i, tok in enumerate(GLOBAL_SPECIALS)}
        self._blocks: dict[str, _Block] = {}
        self._token_ids: dict[str, int] = dict(self._specials)  # every special token string → id
        self._size = text_size + len(GLOBAL_SPECIALS)
        self._manifest: dict[str, Any] | None = None

    # ---- construction ------------------------------------------------------
    @classmethod
    def build(
        cls, text_size: int, specs: Sequence[ModalitySpec] = (), *, text_sha256: str | None = None
    ) -> UnifiedVocab:
        vocab = cls(text_size, text_sha256=text_sha256)
        for spec in specs:
            vocab = vocab.add_modality(spec)
        return vocab

    def add_modality(self, spec: ModalitySpec) -> UnifiedVocab:
        """A new vocabulary with ``spec``'s block appended; every existing id is unchanged."""
        if not isinstance(spec, ModalitySpec):
            raise ValueError(
                f"add_modality needs a ModalitySpec, got {type(spec).__name__}; pass plugin.spec"
            )
        if spec.name in self._blocks:
            raise ValueError(
                f"modality {spec.name!r} is already in the vocabulary (ids "
                f"{self.local_range(spec.name)}); each modality is added once"
            )
        try:
            json.dumps(spec.to_dict(), sort_keys=True)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"modality {spec.name!r}: spec.extra={spec.extra!r} is not JSON-serialisable ({e}); "
                f"keep only str/int/float/bool/list/dict values in extra"
            ) from e
        new_tokens = [f"<|begin_{spec.name}|>", f"<|end_{spec.name}|>", *spec.special_tokens]
        if len(set(new_tokens)) != len(new_tokens):
            raise ValueError(
                f"modality {spec.name!r}: special_tokens={list(spec.special_tokens)} repeat a token or "
                f"its begin/end token; list each token once"
            )
        taken = [t for t in new_tokens if t in self._token_ids]
        if taken:
            raise ValueError(
                f"modality {spec.name!r}: special token(s) {taken} already belong to the vocabulary "
                f"(ids {[self._token_ids[t] for t in taken]}); give them a modality-specific name, "
                f"e.g. '<|{spec.name}_...|>'"
            )
        new = copy.copy(self)  # shares the immutable parts; the tables below are copied
        new._blocks = dict(self._blocks)
        new._token_ids = dict(self._token_ids)
        base = self._size
        ids = {tok: base + i for i, tok in enumerate(new_tokens)}
        start = base + len(new_tokens)
        stop = start + spec.layout.local_size
        new._blocks[spec.name] = _Block(
            spec=spec,
            begin_id=ids[new_tokens[0]],
            end_id=ids[new_tokens[1]],
            special_ids={t: ids[t] for t in spec.special_tokens},
            start=start,
            stop=stop,
        )
        new._token_ids.update(ids)
        new._size = stop
        new._manifest = None
        return new

    # ---- sizes and special ids --------------------------------------------------
    @property
    def size(self) -> int:
        """Total number of ids (the LLM's embedding rows)."""
        return self._size

    @property
    def text_size(self) -> int:
        return self._text_size

    @property
    def text_sha256(self) -> str | None:
        return self._text_sha256

    @property
    def bos_id(self) -> int:
        return self._specials["<|bos|>"]

    @property
    def eos_id(self) -> int:
        return self._specials["<|eos|>"]

    @property
    def pad_id(self) -> int:
        return self._specials["<|pad|>"]

    @property
    def role_ids(self) -> dict[str, int]:
        return {r: self._specials[f"<|{r}|>"] for r in ROLES}

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names in the order they were added (= id order)."""
        return tuple(self._blocks)

    def _block(self, name: str) -> _Block:
        if name not in self._blocks:
            close = difflib.get_close_matches(str(name), list(self._blocks), n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ValueError(
                f"modality {name!r} is not in this vocabulary{hint}; it has {list(self._blocks)}. "
                f"Add it with vocab.add_modality(plugin.spec)"
            )
        return self._blocks[name]

    def spec(self, name: str) -> ModalitySpec:
        return self._block(name).spec

    def begin_id(self, name: str) -> int:
        return self._block(name).begin_id

    def end_id(self, name: str) -> int:
        return self._block(name).end_id

    def special_id(self, token: str) -> int:
        """Id of any special token: a global one (``"<|bos|>"``), a begin/end token or a
        modality's extra special token."""
        if token not in self._token_ids:
            close = difflib.get_close_matches(str(token), list(self._token_ids), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(map(repr, close))}?" if close else "no close match"
            raise ValueError(
                f"special token {token!r} is not in this vocabulary ({hint}); special tokens are "
                f"written like '<|bos|>' or '<|begin_image|>'"
            )
        return self._token_ids[token]

    def local_range(self, name: str) -> tuple[int, int]:
        """Global ``[start, stop)`` of ``name``'s local ids."""
        b = self._block(name)
        return b.start, b.stop

    # ---- conversions -------------------------------------------------------------
    @staticmethod
    def _as_ids(ids: Tensor | int | Sequence[int], what: str) -> Tensor:
        t = torch.as_tensor(ids)
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise ValueError(f"{what} must be integers, got dtype {t.dtype}; pass a LongTensor or ints")
        return t.long()

    def to_global(self, name: str, local: Tensor | int) -> Tensor:
        """Local ids of modality ``name`` (any shape) → global ids (same shape)."""
        b = self._block(name)
        t = self._as_ids(local, f"local ids of {name!r}")
        n = b.stop - b.start
        bad = (t < 0) | (t >= n)
        if bad.any():
            v = int(t[bad].reshape(-1)[0])
            raise ValueError(
                f"local id {v} is outside {name!r}'s local range [0, {n}); encode with the plugin "
                f"this vocabulary was built from (fingerprint {b.spec.fingerprint[:12]})"
            )
        return t + b.start

    def to_local(self, name: str, global_ids: Tensor | int) -> Tensor:
        """Global ids (any shape) that must all be ``name``'s local ids → local ids."""
        b = self._block(name)
        t = self._as_ids(global_ids, "global ids")
        bad = (t < b.start) | (t >= b.stop)
        if bad.any():
            v = int(t[bad].reshape(-1)[0])
            what = self.explain(v) if 0 <= v < self._size else f"id {v}: outside the vocabulary"
            raise ValueError(
                f"global id {v} is not a {name!r} code: {name!r} local ids are [{b.start}, {b.stop}) "
                f"({what}); strip begin/end tokens and pass only the span's codes"
            )
        return t - b.start

    def modality_of(self, global_id: int) -> str | None:
        """The modality whose block holds ``global_id`` (its begin/end/special tokens
        and local ids); ``None`` for text ids and global special tokens."""
        g = self._check_id(global_id)
        for name, b in self._blocks.items():
            if b.begin_id <= g < b.stop:
                return name
        return None

    def _check_id(self, global_id: int) -> int:
        g = int(global_id)
        if not 0 <= g < self._size:
            raise ValueError(f"id {g} is outside the vocabulary [0, {self._size})")
        return g

    def explain(self, global_id: int) -> str:
        """What an id is, e.g. ``"id 5012: image level 0 code 17 (local 1041)"``."""
        g = self._check_id(global_id)
        if g < self._text_size:
            return f"id {g}: text piece {g}"
        for tok, i in self._token_ids.items():
            if i == g:
                name = self.modality_of(g)
                return f"id {g}: special token {tok}" + (f" ({name})" if name else "")
        name = self.modality_of(g)
        b = self._blocks[name]
        layout = b.spec.layout
        local = g - b.start
        for m, off in zip(layout.meta, layout.meta_offsets, strict=True):
            if off <= local < off + m.size:
                return f"id {g}: {name} meta {m.name}={local - off + m.low} (local {local})"
        lv = max(i for i, off in enumerate(layout.level_offsets) if off <= local)
        return f"id {g}: {name} level {lv} code {local - layout.level_offsets[lv]} (local {local})"

    # ---- manifest ----------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """The JSON-ready description of every id (a fresh copy on each call)."""
        if self._manifest is None:
            self._manifest = self._build_manifest()
        return copy.deepcopy(self._manifest)

    def _build_manifest(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "text": {"size": self._text_size, "sha256": self._text_sha256},
            "specials": dict(self._specials),
            "modalities": [
                {
                    "name": name,
                    "spec": b.spec.to_dict(),
                    "begin_id": b.begin_id,
                    "end_id": b.end_id,
                    "special_ids": dict(b.special_ids),
                    "start": b.start,
                    "stop": b.stop,
                }
                for name, b in self._blocks.items()
            ],
            "size": self._size,
        }
        m["hash"] = manifest_hash(m)
        return m

    @property
    def manifest_hash(self) -> str:
        if self._manifest is None:
            self._manifest = self._build_manifest()
        return self._manifest["hash"]

    def save_manifest(self, path: str | os.PathLike) -> None:
        save_json(path, self.manifest())

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> UnifiedVocab:
        """Rebuild the vocabulary a manifest describes; a manifest whose ids or hash do not
        match its own specs (edited by hand, corrupt) raises :class:`ManifestMismatchError`."""
        if not isinstance(manifest, dict):
            raise ManifestMismatchError(f"a manifest is a dict, got {type(manifest).__name__}")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestMismatchError(
                f"manifest schema_version={version!r}, this Tessera reads version {SCHEMA_VERSION}; "
                f"rebuild the manifest with this version"
            )
        try:
            text = manifest["text"]
            specs = [ModalitySpec.from_dict(m["spec"]) for m in manifest["modalities"]]
            vocab = cls.build(int(text["size"]), specs, text_sha256=text.get("sha256"))
        except (KeyError, TypeError) as e:
            raise ManifestMismatchError(
                f"manifest is missing or mistypes field {e}; it is not a Tessera vocabulary manifest "
                f"(expected keys schema_version, text, specials, modalities, size, hash)"
            ) from e
        rebuilt = vocab.manifest()
        stored = manifest.get("hash")
        if stored != manifest_hash(manifest):
            raise ManifestMismatchError(
                f"manifest hash {stored!r} does not match its content ({manifest_hash(manifest)}); "
                f"the manifest was edited or corrupted. Restore it or re-save it with save_manifest"
            )
        diffs = diff_manifests(rebuilt, manifest)
        if diffs:
            raise ManifestMismatchError(
                "manifest ids do not follow from its specs: " + "; ".join(diffs)
                + ". Re-create it with UnifiedVocab.build(...).save_manifest(path)"
            )
        return vocab

    @classmethod
    def load_manifest(cls, path: str | os.PathLike) -> UnifiedVocab:
        try:
            return cls.from_manifest(load_json(path))
        except ManifestMismatchError as e:
            raise ManifestMismatchError(f"{path}: {e}") from e

    def check_compatible(self, expected_hash: str, expected_manifest: dict[str, Any] | None = None) -> None:
        """Raise :class:`ManifestMismatchError` unless this vocabulary's manifest hash is
        ``expected_hash`` (e.g. the one a checkpoint was trained with). With the expected
        manifest the message lists what differs."""
        got = self.manifest_hash
        if got == expected_hash:
            return
        if expected_manifest is None:
            detail = "pass the checkpoint's manifest as expected_manifest to see what differs"
        else:
            diffs = diff_manifests(expected_manifest, self.manifest())
            detail = "; ".join(diffs) if diffs else "the manifests match but the expected hash does not"
        raise ManifestMismatchError(
            f"vocabulary manifest {got[:12]} is not the {str(expected_hash)[:12]} the checkpoint was "
            f"trained with: {detail}. Load the checkpoint with its own manifest (or retrain)"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnifiedVocab) and self.manifest_hash == other.manifest_hash

    def __hash__(self) -> int:
        return hash(self.manifest_hash)

    def __repr__(self) -> str:
        mods = ", ".join(f"{n}[{b.start},{b.stop})" for n, b in self._blocks.items())
        return f"UnifiedVocab(size={self._size}, text={self._text_size}, modalities=[{mods}])"


def diff_manifests(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Human-readable differences between manifest ``a`` (expected) and ``b`` (got)."""
    out: list[str] = []

    def cmp(what: str, x: Any, y: Any) -> None:
        if x != y:
            out.append(f"{what}: expected {x!r}, got {y!r}")

    cmp("schema_version", a.get("schema_version"), b.get("schema_version"))
    ta, tb = a.get("text") or {}, b.get("text") or {}
    cmp("text model size", ta.get("size"), tb.get("size"))
    cmp("text model sha256", ta.get("sha256"), tb.get("sha256"))
    sa, sb = a.get("specials") or {}, b.get("specials") or {}
    for tok in sorted(set(sa) | set(sb)):
        cmp(f"special token {tok} id", sa.get(tok), sb.get(tok))
    ma = {m["name"]: (i, m) for i, m in enumerate(a.get("modalities") or [])}
    mb = {m["name"]: (i, m) for i, m in enumerate(b.get("modalities") or [])}
    for name in ma:
        if name not in mb:
            out.append(f"modality {name!r}: expected, missing")
    for name in mb:
        if name not in ma:
            out.append(f"modality {name!r}: not expected, present")
    for name in (n for n in ma if n in mb):
        (ia, x), (ib, y) = ma[name], mb[name]
        cmp(f"modality {name!r} position", ia, ib)
        cmp(f"modality {name!r} range", [x.get("start"), x.get("stop")], [y.get("start"), y.get("stop")])
        cmp(f"modality {name!r} begin/end ids", [x.get("begin_id"), x.get("end_id")], [y.get("begin_id"), y.get("end_id")])
        cmp(f"modality {name!r} special ids", x.get("special_ids"), y.get("special_ids"))
        xs, ys = x.get("spec") or {}, y.get("spec") or {}
        for key in sorted(set(xs) | set(ys)):
            cmp(f"modality {name!r} {key}", xs.get(key), ys.get(key))
    cmp("size", a.get("size"), b.get("size"))
    if not out and a.get("hash") != b.get("hash"):
        out.append(f"hash: expected {a.get('hash')!r}, got {b.get('hash')!r}")
    return out
