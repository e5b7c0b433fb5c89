"""The text tokenizer: a sentencepiece model (BPE or unigram, Kudo & Richardson 2018,
"SentencePiece: A simple and language independent subword tokenizer and detokenizer
for Neural Text Processing") trained from files or an iterable of strings.

Text owns the ids ``[0, vocab_size)`` of the unified vocabulary. sentencepiece's own
bos/eos/pad are disabled (the vocabulary owns those, see :mod:`tessera.core.vocab`);
``<unk>`` stays at id 0. By default no normalisation is applied and byte fallback is on,
so ``decode(encode(s)) == s`` for every string ``s``. No model ships with the package:
train one (seconds for a small corpus) or load a ``.model`` file.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from torch import Tensor

from .checkpoint import atomic_write_bytes
from .vocab import GLOBAL_SPECIALS

__all__ = ["TextTokenizer", "BYTE_FALLBACK_PIECES"]

BYTE_FALLBACK_PIECES = 256  # <0x00> ... <0xFF>


def _lines(texts: Iterable[str] | os.PathLike | Sequence[os.PathLike]) -> Iterator[str]:
    """Sentences from an iterable of strings, or lines from one file / a list of files
    (files are given as ``pathlib.Path`` objects; plain strings are sentences)."""
    if isinstance(texts, str):
        raise ValueError(
            f"texts is one string ({texts[:40]!r}...); pass a list of sentences, or "
            f"pathlib.Path(...) objects for files"
        )
    items = [texts] if isinstance(texts, os.PathLike) else texts
    for item in items:
        if isinstance(item, os.PathLike):
            path = Path(item)
            if not path.is_file():
                raise ValueError(f"training file {path} does not exist; check the path")
            with path.open(encoding="utf-8") as f:
                for line in f:
                    yield line.rstrip("\n")
        elif isinstance(item, str):
            yield item
        else:
            raise ValueError(f"training texts must be str or pathlib.Path, got {type(item).__name__}: {item!r}")


class TextTokenizer:
    """A loaded sentencepiece model (immutable)."""

    def __init__(self, model_proto: bytes, *, source: str = "<bytes>") -> None:
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{source}: not a sentencepiece model ({e}); train one with TextTokenizer.train") from e
        for what, i in (("bos", self._sp.bos_id()), ("eos", self._sp.eos_id()), ("pad", self._sp.pad_id())):
            if i >= 0:
                raise ValueError(
                    f"{source}: the sentencepiece model defines its own {what} (id {i}); Tessera's vocabulary "
                    f"owns bos/eos/pad, retrain with TextTokenizer.train (which disables them)"
                )

    @classmethod
    def train(
        cls,
        texts: Iterable[str] | os.PathLike | Sequence[os.PathLike],
        *,
        vocab_size: int,
        model_type: Literal["bpe", "unigram"] = "bpe",
        user_defined_symbols: Sequence[str] = (),
        byte_fallback: bool = True,
        character_coverage: float = 0.9995,
        out: str | os.PathLike | None = None,
    ) -> TextTokenizer:
        """Train on sentences (an iterable of ``str``) or files (``Path`` objects, one
        sentence per line); save to ``out`` if given. Nothing is written to temp files."""
        import sentencepiece as spm

        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type={model_type!r} unknown; use 'bpe' or 'unigram'")
        symbols = list(user_defined_symbols)
        reserved = [s for s in symbols if s in GLOBAL_SPECIALS or s.startswith(("<|begin_", "<|end_"))]
        if reserved:
            raise ValueError(
                f"user_defined_symbols {reserved} are special tokens owned by the unified vocabulary; "
                f"drop them (the vocabulary adds them after the text ids)"
            )
        floor = 1 + len(symbols) + (BYTE_FALLBACK_PIECES if byte_fallback else 0)
        if vocab_size <= floor:
            raise ValueError(
                f"vocab_size={vocab_size} leaves no room for learned pieces: <unk> + {len(symbols)} user "
                f"symbol(s){' + 256 byte pieces' if byte_fallback else ''} already take {floor}; use "
                f"vocab_size > {floor}"
            )
        writer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_lines(texts),
                model_writer=writer,
                vocab_size=vocab_size,
                model_type=model_type,
                user_defined_symbols=symbols,
                byte_fallback=byte_fallback,
                character_coverage=character_coverage,
                unk_id=0,
                bos_id=-1,
                eos_id=-1,
                pad_id=-1,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                num_threads=1,
                minloglevel=2,
            )
        except RuntimeError as e:
            if "smaller than required_chars" in str(e):
                fix = f"raise vocab_size (now {vocab_size}) or lower character_coverage (now {character_coverage})"
            else:
                fix = f"with a small corpus lower vocab_size (now {vocab_size}) or give more text"
            raise ValueError(f"sentencepiece training failed: {e}; {fix}") from e
        tok = cls(writer.getvalue())
        if out is not None:
            tok.save(out)
        return tok

    # ---- files -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the ``.model`` file (atomic)."""
        atomic_write_bytes(path, self._proto)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TextTokenizer:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"{p}: no such sentencepiece model file; train one with TextTokenizer.train(out=...)")
        return cls(p.read_bytes(), source=str(p))

    @property
    def sha256(self) -> str:
        """Fingerprint of the model file (stored in the vocabulary manifest)."""
        return hashlib.sha256(self._proto).hexdigest()

    # ---- ids -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}; decode bytes first")
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        ids = [int(i) for i in (ids.reshape(-1).tolist() if isinstance(ids, Tensor) else ids)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"text id {bad[0]} is outside the text range [0, {self.vocab_size}); pass only text ids "
                f"(split special and modality tokens off first)"
            )
        return self._sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        if not 0 <= int(i) < self.vocab_size:
            raise ValueError(f"text id {i} is outside [0, {self.vocab_size})")
        return self._sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
