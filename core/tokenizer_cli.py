"""The ``encode``/``decode`` verbs every tokenizer plugin's command line shares
(``tessera tokenizer encode|decode MODALITY ...``), as plain functions a plugin's
``cli.py`` calls with its tokenizer class.

The ids file is JSON ``{"modality": NAME, "fingerprint": SHA256 of the weights, "ids": [...]}``;
decoding checks both, so ids are never decoded by weights that did not make them.

    sub = parser.add_subparsers(dest="verb", required=True)
    add_codec_verbs(sub, media="GIF/MP4 file", encode=cmd_encode, decode=cmd_decode)
    ...
    def cmd_encode(args):
        tok = load_tokenizer(VideoTokenizer, args.checkpoint)
        ids, out, seconds = encode_file(tok, args.input, args.out)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from .spec import ModalityPlugin

__all__ = [
    "load_tokenizer",
    "with_overrides",
    "timed",
    "write_ids_file",
    "read_ids_file",
    "encode_file",
    "decode_file",
    "add_codec_verbs",
]

T = TypeVar("T")
P = TypeVar("P", covariant=True)


class _Loadable(Protocol[P]):
    def pretrained(self) -> P: ...
    def load(self, path: str) -> P: ...


def load_tokenizer(cls: _Loadable[P], checkpoint: str | os.PathLike | None) -> P:
    """``cls.pretrained()`` without a checkpoint folder, else ``cls.load(checkpoint)``."""
    return cls.pretrained() if checkpoint is None else cls.load(str(checkpoint))


def with_overrides(config: T, args: argparse.Namespace, names: Iterable[str]) -> T:
    """``dataclasses.replace(config, NAME=args.NAME, ...)`` for each of ``names`` given on
    the command line (not ``None``); the config's own checks run on the result."""
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return dataclasses.replace(config, **given)  # type: ignore[type-var]  # T is a dataclass


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """``(fn(*args, **kwargs), wall seconds)``."""
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def write_ids_file(path: str | os.PathLike, *, modality: str, fingerprint: str, ids: Tensor) -> Path:
    """Write the ids JSON of ``modality`` (see the module docstring); returns the path."""
    out = Path(path)
    doc = {"modality": modality, "fingerprint": fingerprint, "ids": ids.reshape(-1).tolist()}
    out.write_text(json.dumps(doc) + "\n")
    return out


def read_ids_file(path: str | os.PathLike, *, modality: str, fingerprint: str) -> Tensor:
    """The 1-D LongTensor of an ids file written by :func:`write_ids_file` for ``modality``
    by the weights of ``fingerprint``; any other file raises ``ValueError`` saying why."""
    src = Path(path)
    how = f"expected the JSON written by 'tessera tokenizer encode {modality}'"
    try:
        doc = json.loads(src.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{src}: not an ids file ({e}); {how}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("ids"), list):
        raise ValueError(f"{src}: no 'ids' list; {how}")
    if doc.get("modality") != modality:
        raise ValueError(f"{src}: ids of modality {doc.get('modality')!r}, not {modality!r}; {how}")
    found = doc.get("fingerprint")
    if found is not None and found != fingerprint:
        raise ValueError(
            f"{src} was encoded by a tokenizer with fingerprint {str(found)[:12]}…, this one is "
            f"{fingerprint[:12]}…; decode with the checkpoint that encoded it (--checkpoint)"
        )
    try:
        return torch.tensor(doc["ids"], dtype=torch.long)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{src}: 'ids' is not a flat list of integers ({e}); {how}") from e


def encode_file(
    tok: ModalityPlugin, source: str | os.PathLike, out: str | os.PathLike | None
) -> tuple[Tensor, Path, float]:
    """Read a media file, encode it and write its ids file (default ``SOURCE.ids.json``).
    Returns ``(ids, ids file, encode seconds)``."""
    media = tok.read(str(source))
    ids, seconds = timed(tok.encode, media)
    target = Path(source).with_suffix(".ids.json") if out is None else Path(out)
    spec = tok.spec
    write_ids_file(target, modality=spec.name, fingerprint=spec.fingerprint, ids=ids)
    return ids, target, seconds


def decode_file(
    tok: ModalityPlugin,
    source: str | os.PathLike,
    out: str | os.PathLike | None,
    *,
    default_suffix: str,
    **decode_options: Any,
) -> tuple[Tensor, Tensor, Path, float]:
    """Read an ids file, check it belongs to ``tok`` and decode it to a media file (default
    ``SOURCE`` without its suffix + ``.decoded`` + ``default_suffix``). ``decode_options``
    go to ``tok.decode``. Returns ``(media, ids, media file, decode seconds)``."""
    spec = tok.spec
    ids = read_ids_file(source, modality=spec.name, fingerprint=spec.fingerprint)
    media, seconds = timed(tok.decode, ids, **decode_options)
    target = Path(str(Path(source).with_suffix("")) + ".decoded" + default_suffix) if out is None else Path(out)
    tok.write(media, str(target))
    return media, ids, target, seconds


def add_codec_verbs(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]  # argparse keeps this class private
    *,
    media: str,
    encode: Callable[[argparse.Namespace], int],
    decode: Callable[[argparse.Namespace], int],
    decoded_suffix: str,
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Add the ``encode`` and ``decode`` sub-commands (``input``, ``--out``/``--output``,
    ``--checkpoint``) and return their parsers, for a plugin to add its own options."""
    parsers = []
    for verb, helptext, fn, default in (
        ("encode", f"{media} -> token ids (JSON)", encode, "INPUT.ids.json"),
        ("decode", f"token ids (JSON) -> {media}", decode, f"INPUT.decoded{decoded_suffix}"),
    ):
        s = sub.add_parser(verb, help=helptext)
        s.add_argument("input")
        s.add_argument("--out", "--output", dest="out", help=f"file to write (default: {default})")
        s.add_argument("--checkpoint", help="tokenizer folder (default: the shipped checkpoint)")
        s.set_defaults(func=fn)
        parsers.append(s)
    return parsers[0], parsers[1]
