"""``tessera tokenize``: users' data → token shards for ``tessera train``, with a bundle's tokenizers.

Inputs (files, or folders holding them):

* **JSONL** (``.jsonl``): one document per line in the chat content-parts form of
  :class:`tessera.core.document.Document` (``{"messages": [...]}`` or a plain interleaved
  list), media given as ``{"type": "image", "path": "cat.png"}``; relative paths resolve
  against the JSONL file's folder. Chat documents train on the assistant's turns, plain
  lists on every token.
* **webdataset shards** (``.tar``): samples of one raw media file (an extension a bundle
  tokenizer reads: ``.png``, ``.wav``, ``.mp4``, ...) plus its caption (``.txt``, or
  ``.json`` with a ``"caption"``); each sample becomes a text→media and a media→text
  document with the built-in instruction templates, so the task pipelines work on the
  fine-tuned model as on the default one.

The work is cut into units (``--chunk-size`` lines of a JSONL file, or one ``.tar``),
each written as one output shard ``part-NNNNNN.tar`` by a pool of worker processes that
load the tokenizers once each. ``tokenize_state.json`` records every finished unit, so a
killed run resumes where it stopped (``index.json`` is written at the end). A file or
sample that cannot be read is refused with a message naming it and counted; the run goes on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..core.checkpoint import load_json, save_json

__all__ = ["TokenizeSummary", "tokenize_files", "main", "STATE_NAME"]

STATE_NAME = "tokenize_state.json"
_MAX_REPORTED = 20  # refusals listed in the summary (all are counted)


@dataclass
class TokenizeSummary:
    """What a run did (JSON-serialisable)."""

    units: int = 0
    skipped_units: int = 0  # finished by an earlier run
    docs: int = 0
    tokens: int = 0
    refused: int = 0
    refusals: list[str] = field(default_factory=list)  # the first messages, each naming its file
    seconds: float = 0.0
    out_dir: str = ""


@dataclass(frozen=True)
class _Unit:
    name: str
    kind: str  # "jsonl" or "tar"
    path: str
    start: int = 0  # first line (jsonl)
    stop: int = 0  # one past the last line (jsonl)


# ---- planning ------------------------------------------------------------------------------
def _input_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in (".jsonl", ".tar"))
            if not found:
                raise ValueError(f"{p}: no .jsonl or .tar files in this folder; point at your data files")
            files += found
        elif p.is_file():
            if p.suffix not in (".jsonl", ".tar"):
                raise ValueError(f"{p}: unknown input type {p.suffix!r}; give .jsonl documents or .tar webdataset shards")
            files.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder; check the path")
    return files


def _plan(files: list[Path], chunk_size: int) -> list[_Unit]:
    units: list[_Unit] = []
    for f in files:
        if f.suffix == ".tar":
            units.append(_Unit(name=f"part-{len(units):06d}", kind="tar", path=str(f.resolve())))
            continue
        with f.open("rb") as fh:
            n_lines = sum(1 for _ in fh)
        for start in range(0, max(n_lines, 1), chunk_size):
            units.append(_Unit(name=f"part-{len(units):06d}", kind="jsonl", path=str(f.resolve()),
                               start=start, stop=min(start + chunk_size, n_lines)))
    return units


# ---- workers ---------------------------------------------------------------------------------
_worker: dict[str, Any] = {}


def _init_worker(bundle_path: str) -> None:
    """Load the bundle's tokenizers once per process (not the LLM)."""
    import torch

    from .bundle import load_tokenizers

    torch.set_num_threads(1)
    vocab, text, tokenizers, _ = load_tokenizers(bundle_path)
    _worker.update(vocab=vocab, text=text, tokenizers=tokenizers, manifest=vocab.manifest())


def _jsonl_documents(unit: _Unit, refuse: list[str]) -> Iterator[Any]:
    from ..core.document import Document

    base = Path(unit.path).parent
    with open(unit.path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f):
            if lineno < unit.start:
                continue
            if lineno >= unit.stop:
                break
            if not line.strip():
                continue
            try:
                yield Document.from_json(json.loads(line), base_dir=base)
            except (json.JSONDecodeError, ValueError) as e:
                refuse.append(f"{unit.path}:{lineno + 1}: {e}")


def _caption(files: dict[str, bytes], where: str) -> str:
    if "txt" in files:
        return files["txt"].decode("utf-8").strip()
    if "json" in files:
        meta = json.loads(files["json"])
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            return meta["caption"].strip()
    raise ValueError(f"{where}: no caption (give a .txt file, or a .json with a 'caption', next to the media)")


def _tar_documents(unit: _Unit, refuse: list[str]) -> Iterator[Any]:
    """Per sample: media + caption → a text→media and a media→text document."""
    from .corpus import task_document

    tokenizers = _worker["tokenizers"]
    by_ext = {ext.lstrip("."): name for name, p in tokenizers.items() for ext in p.file_extensions}
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(unit.path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = Path(member.name).name.partition(".")
                samples.setdefault(str(Path(member.name).parent / key), {})[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        refuse.append(f"{unit.path}: not a readable .tar webdataset shard ({e})")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for key, files in samples.items():
            where = f"{unit.path}:{key}"
            media_ext = [e for e in files if e in by_ext]
            try:
                if len(media_ext) != 1:
                    raise ValueError(f"{where}: expected one media file of {sorted(by_ext)}, found {sorted(files)}")
                ext = media_ext[0]
                name = by_ext[ext]
                caption = _caption(files, where)
                path = Path(tmp) / f"sample.{ext}"
                path.write_bytes(files[ext])
                media = tokenizers[name].read(str(path))
            except Exception as e:  # a bad sample never stops the run
                refuse.append(f"{where}: {e}" if where not in str(e) else str(e))
                continue
            variant = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 3
            kind = tokenizers[name].media_kind
            for task in ("text-to-media", "media-to-text"):
                yield task_document(task, name, kind, media, caption, variant=variant)


def _run_unit(unit: _Unit, out_dir: str) -> dict[str, Any]:
    """Tokenize one unit into ``out_dir/<name>.tar``; returns its record."""
    from ..llm.data import INDEX_NAME, write_token_shards
    from .corpus import train_on_for

    vocab, text, tokenizers, manifest = (_worker[k] for k in ("vocab", "text", "tokenizers", "manifest"))
    refused: list[str] = []
    docs = _jsonl_documents(unit, refused) if unit.kind == "jsonl" else _tar_documents(unit, refused)

    def encoded() -> Iterator[dict[str, Any]]:
        for doc in docs:
            try:
                ids, mask = doc.to_ids(vocab, text, tokenizers, train_on=train_on_for(doc))
            except Exception as e:  # unreadable media, wrong shapes: refuse the document, go on
                refused.append(f"{unit.path}: {e}" if unit.path not in str(e) else str(e))
                continue
            if ids.numel() > 1:
                yield {"ids": ids, "loss_mask": mask}

    tmp = Path(out_dir) / f".{unit.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    record: dict[str, Any] = {"name": None, "docs": 0, "tokens": 0, "max_id": 0, "refused": refused}
    try:
        write_token_shards(encoded(), tmp, manifest["hash"], shard_size=1 << 30, manifest=manifest)
    except ValueError as e:
        if "no documents" not in str(e):
            raise
        return record  # every document of the unit was refused (or it was empty)
    index = load_json(tmp / INDEX_NAME)
    os.replace(tmp / index["shards"][0]["name"], Path(out_dir) / f"{unit.name}.tar")
    shutil.rmtree(tmp, ignore_errors=True)
    record.update(name=f"{unit.name}.tar", docs=index["docs"], tokens=index["tokens"], max_id=index["max_id"],
                  format={k: index[k] for k in ("format", "version", "modalities", "vocab_size")})
    return record


# ---- the run ------------------------------------------------------------------------------------
def tokenize_files(inputs: Sequence[str | os.PathLike], bundle: str | os.PathLike, out_dir: str | os.PathLike, *,
                   workers: int = 0, chunk_size: int = 1000, progress: bool = True) -> TokenizeSummary:
    """Tokenize ``inputs`` with ``bundle``'s tokenizers into token shards in ``out_dir``
    (see the module docstring). ``workers=0`` runs in this process. Resumes a run killed
    in the same ``out_dir`` with the same inputs."""
    from tqdm import tqdm

    from ..llm.data import INDEX_NAME
    from .bundle import read_vocab

    if workers < 0 or chunk_size < 1:
        raise ValueError(f"workers={workers}, chunk_size={chunk_size}: need workers >= 0 and chunk_size >= 1")
    t0 = time.perf_counter()
    out = Path(out_dir)
    files = _input_files(inputs)
    manifest = read_vocab(bundle).manifest()
    units = _plan(files, chunk_size)
    plan = {"bundle_manifest": manifest["hash"], "units": [asdict(u) for u in units]}
    state: dict[str, Any] = {"plan": plan, "done": {}}
    if (out / STATE_NAME).is_file():
        saved = load_json(out / STATE_NAME)
        if saved.get("plan") != plan:
            raise ValueError(f"{out} holds a tokenize run of other inputs, chunk size or bundle; resume it with the "
                             f"same arguments, or write to a new --out folder")
        state = saved
    elif (out / INDEX_NAME).exists():
        raise ValueError(f"{out} already holds token shards; write to a new --out folder or delete it")
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / STATE_NAME, state)

    todo = [u for u in units if u.name not in state["done"]]
    summary = TokenizeSummary(units=len(units), skipped_units=len(units) - len(todo), out_dir=str(out))
    bar = tqdm(total=len(units), initial=summary.skipped_units, desc="tokenize", unit="part", disable=not progress)

    def finish(unit: _Unit, record: dict[str, Any]) -> None:
        state["done"][unit.name] = record
        save_json(out / STATE_NAME, state)  # atomic: a kill leaves the previous cursor
        bar.update(1)
        bar.set_postfix(docs=sum(r["docs"] for r in state["done"].values()),
                        refused=sum(len(r["refused"]) for r in state["done"].values()))

    if workers == 0:
        _init_worker(str(bundle))
        for unit in todo:
            finish(unit, _run_unit(unit, str(out)))
    elif todo:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                 initializer=_init_worker, initargs=(str(bundle),)) as pool:
            futures = [(u, pool.submit(_run_unit, u, str(out))) for u in todo]
            for unit, fut in futures:
                finish(unit, fut.result())
    bar.close()

    records = [state["done"][u.name] for u in units]
    written = [r for r in records if r["name"] is not None]
    refusals = [m for r in records for m in r["refused"]]
    summary.docs = sum(r["docs"] for r in written)
    summary.tokens = sum(r["tokens"] for r in written)
    summary.refused = len(refusals)
    summary.refusals = refusals[:_MAX_REPORTED]
    if not written:
        raise ValueError(f"no document of {[str(f) for f in files]} could be tokenized ({len(refusals)} refused); "
                         f"first refusal: {refusals[0] if refusals else 'the inputs are empty'}")
    save_json(out / INDEX_NAME, {
        **written[0]["format"], "manifest_hash": manifest["hash"], "max_id": max(r["max_id"] for r in written),
        "docs": summary.docs, "tokens": summary.tokens,
        "shards": [{"name": r["name"], "docs": r["docs"], "tokens": r["tokens"]} for r in written],
    })
    summary.seconds = round(time.perf_counter() - t0, 2)
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tessera tokenize",
        description="Turn your data (JSONL chat documents with media paths, or webdataset .tar shards of media + "
                    "captions) into token shards for `tessera train`, with a bundle's tokenizers.",
        epilog="examples:\n  tessera tokenize data/docs.jsonl --out shards/\n"
               "  tessera tokenize data/shards/ --bundle my_bundle --out shards/ --workers 2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help=".jsonl files, .tar shards, or folders of them")
    p.add_argument("--out", required=True, help="output folder for the token shards (resumed if it holds a run)")
    p.add_argument("--bundle", default=None, help="bundle whose tokenizers to use (default: the default bundle)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (0: in this one)")
    p.add_argument("--chunk-size", type=int, default=1000, help="JSONL lines per output shard")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .bundle import DEFAULT_BUNDLE

    args = _parser().parse_args(argv)
    try:
        summary = tokenize_files(args.inputs, args.bundle or DEFAULT_BUNDLE, args.out, workers=args.workers,
                                 chunk_size=args.chunk_size, progress=args.progress)
    except ValueError as e:
        print(f"tessera tokenize: error: {e}", file=sys.stderr)
        return 2
    for message in summary.refusals:
        print(f"refused: {message}", file=sys.stderr)
    if summary.refused > len(summary.refusals):
        print(f"... and {summary.refused - len(summary.refusals)} more refused", file=sys.stderr)
    print(f"tokenized {summary.docs} documents ({summary.tokens} tokens) into {summary.out_dir} in {summary.seconds} s; "
          f"{summary.refused} refused; {summary.skipped_units} of {summary.units} parts were done by an earlier run")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
