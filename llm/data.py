"""Token-shard data for LLM training: webdataset shards of pre-tokenized documents, and a
reader that shuffles, packs to the context length, splits across ranks and dataloader
workers, and resumes exactly from a saved position.

**Shards.** A folder of webdataset ``.tar`` files plus ``index.json``. One sample is one
document: ``ids.npy`` (uint16, or int32 when an id does not fit), ``mask.npy`` (uint8:
1 = this token is a training target), optionally ``weight.npy`` (float32 per-token loss
weight) and ``modality.npy`` (uint8 tag: 0 = text and specials, k = the k-th modality of
the manifest, for its codes and meta tokens), and ``meta.json`` with the manifest hash
the ids were made with. Arrays are ``.npy`` read with ``allow_pickle=False``; nothing is
pickled. The reader refuses a shard whose manifest hash differs from the model's.

**Shuffling.** Windowed and seeded: each epoch permutes the shard order, then permutes
the documents inside each window of ``shuffle_buffer`` consecutive documents. It mixes
like a shuffle buffer of that size, but the permutation is a pure function of
``(seed, epoch, window)``, so the reader's position is three integers — epoch, document
cursor, token offset — and resuming from a saved state dict yields exactly the
continuation.

**Packing.** Documents are concatenated into rows of ``seq_len + 1`` tokens (inputs are
the first ``seq_len``, targets the last ``seq_len``) with no padding. Every document
piece is its own *segment*: ``positions`` restart at 0 at each piece and ``segment_ids``
make attention block-diagonal causal (``TesseraLM.forward``), so packed documents never
attend to each other, and the first token of a piece is never a target of the previous
one. A document longer than the room left is split; its continuation starts the next row
one token early (the last input of the piece), so every token after a document's first
is a target exactly once. A continuation is a new segment (positions restart), so no
position ever exceeds ``seq_len``.

**Ranks and workers.** All ranks read the same global stream of packed rows (reading
token ids is cheap next to training on them); optimizer step ``s`` consumes rows
``[s*G, (s+1)*G)`` with ``G = micro_batch * grad_accum * world_size``, and rank ``r``
takes its slice of each micro-step. So a step sees the same rows whatever the world
size, which is what makes ZeRO runs on 1 and 2 processes comparable. With ``num_workers
> 0`` each DataLoader worker packs the stream and keeps every ``num_workers``-th step;
the DataLoader's round-robin order then restores the step order exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.checkpoint import load_json, save_json

__all__ = [
    "TokenDoc",
    "PackedBatch",
    "TokenShardReader",
    "describe_sources",
    "ShardManifestError",
    "write_token_shards",
    "step_batches",
    "INDEX_NAME",
]

INDEX_NAME = "index.json"
_FORMAT = "tessera-token-shards"
_STATE_VERSION = 1


class ShardManifestError(ValueError):
    """Token shards were made with another vocabulary manifest than the model's."""


@dataclass(kw_only=True)
class TokenDoc:
    """One pre-tokenized document: global ids, which tokens are targets (default: all),
    optional per-token loss weights. ``modality`` (0 = text, k = k-th manifest modality)
    is what the reader returns; the writer computes it from the manifest."""

    ids: np.ndarray
    loss_mask: np.ndarray | None = None
    loss_weight: np.ndarray | None = None
    modality: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def _as_array(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _coerce_doc(doc: Any, i: int) -> TokenDoc:
    """Accept a TokenDoc, an (ids, loss_mask) pair (what ``Document.to_ids`` returns), a
    mapping with "ids" (+ "loss_mask", "loss_weight"), or an object with those attributes."""
    if isinstance(doc, TokenDoc):
        return doc
    if isinstance(doc, tuple) and len(doc) == 2:
        doc = {"ids": doc[0], "loss_mask": doc[1]}
    elif not isinstance(doc, Mapping):
        if not hasattr(doc, "ids"):
            raise ValueError(f"document {i} is a {type(doc).__name__}; give a TokenDoc, an (ids, loss_mask) "
                             f"pair or a mapping with 'ids' and 'loss_mask'")
        doc = {k: getattr(doc, k, None) for k in ("ids", "loss_mask", "loss_weight")}
    if doc.get("ids") is None:
        raise ValueError(f"document {i} has no 'ids' (keys {sorted(doc)}); give {{'ids': ..., 'loss_mask': ...}}")
    optional = {k: None if doc.get(k) is None else _as_array(doc[k]) for k in ("loss_mask", "loss_weight")}
    return TokenDoc(ids=_as_array(doc["ids"]), **optional)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _modality_tags(ids: np.ndarray, manifest: Mapping[str, Any]) -> np.ndarray:
    tags = np.zeros(len(ids), dtype=np.uint8)
    for k, m in enumerate(manifest["modalities"], start=1):
        tags[(ids >= m["start"]) & (ids < m["stop"])] = k
    return tags


def write_token_shards(
    docs_iter: Iterable[Any],
    out_dir: str | os.PathLike,
    manifest_hash: str,
    shard_size: int = 1000,
    *,
    manifest: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write documents as webdataset shards of ``shard_size`` documents each, plus
    ``index.json`` (shard names, document and token counts, the manifest hash).

    With ``manifest`` (the vocabulary's manifest dict; its hash must be ``manifest_hash``)
    ids are range-checked against its size and each token gets a modality tag, which
    per-modality loss weights need. Returns the shard paths.
    """
    import webdataset as wds

    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1 (documents per shard)")
    if not isinstance(manifest_hash, str) or not manifest_hash:
        raise ValueError(f"manifest_hash={manifest_hash!r} must be the vocabulary's manifest hash (a string)")
    if manifest is not None and manifest.get("hash") != manifest_hash:
        raise ShardManifestError(f"manifest_hash {manifest_hash} differs from the given manifest's hash "
                                 f"{manifest.get('hash')}; pass the hash of that manifest")
    out = Path(out_dir)
    if (out / INDEX_NAME).exists():
        raise ValueError(f"{out} already holds token shards ({INDEX_NAME}); write to a new folder or delete it")
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = int(manifest["size"]) if manifest is not None else None

    shards: list[dict[str, Any]] = []
    writer: Any = None
    max_id = 0
    n_docs = 0
    for i, raw in enumerate(docs_iter):
        doc = _coerce_doc(raw, i)
        ids = doc.ids.reshape(-1).astype(np.int64)
        n = len(ids)
        if n == 0:
            raise ValueError(f"document {i} has no tokens; drop empty documents before writing")
        if ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size):
            bad = int(ids.min() if ids.min() < 0 else ids.max())
            raise ValueError(f"document {i} has id {bad}, outside the vocabulary [0, {vocab_size}); "
                             f"tokenize with the vocabulary of manifest {manifest_hash}")
        mask = np.ones(n, np.uint8) if doc.loss_mask is None else doc.loss_mask.reshape(-1).astype(np.uint8)
        if len(mask) != n:
            raise ValueError(f"document {i}: loss_mask has {len(mask)} entries for {n} ids; they must match")
        sample = {"__key__": f"{i:09d}", "ids.npy": _npy(ids.astype(np.uint16 if ids.max() < 2**16 else np.int32)),
                  "mask.npy": _npy(mask),
                  "meta.json": json.dumps({"manifest_hash": manifest_hash, "n_tokens": n}).encode()}
        if doc.loss_weight is not None:
            w = doc.loss_weight.reshape(-1).astype(np.float32)
            if len(w) != n:
                raise ValueError(f"document {i}: loss_weight has {len(w)} entries for {n} ids; they must match")
            sample["weight.npy"] = _npy(w)
        if manifest is not None:
            sample["modality.npy"] = _npy(_modality_tags(ids, manifest))
        if writer is None:
            name = f"shard-{len(shards):06d}.tar"
            writer = wds.TarWriter(str(out / name), encoder=False)
            shards.append({"name": name, "docs": 0, "tokens": 0})
        writer.write(sample)
        shards[-1]["docs"] += 1
        shards[-1]["tokens"] += n
        max_id = max(max_id, int(ids.max()))
        n_docs += 1
        if shards[-1]["docs"] == shard_size:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()
    if n_docs == 0:
        raise ValueError("no documents to write; docs_iter was empty")
    save_json(out / INDEX_NAME, {
        "format": _FORMAT, "version": 1, "manifest_hash": manifest_hash,
        "modalities": [m["name"] for m in manifest["modalities"]] if manifest is not None else None,
        "vocab_size": vocab_size, "max_id": max_id, "docs": n_docs,
        "tokens": sum(s["tokens"] for s in shards), "shards": shards,
    })
    return [out / s["name"] for s in shards]


def describe_sources(path: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """One shard source, or several joined with commas, for messages."""
    return str(path) if isinstance(path, (str, os.PathLike)) else ", ".join(map(str, path))


def _iter_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) per webdataset sample, in file order."""
    key: str | None = None
    files: dict[str, bytes] = {}
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            if key is not None and k != key:
                yield key, files
                files = {}
            key = k
            f = tar.extractfile(member)
            files[ext] = f.read() if f is not None else b""
    if key is not None:
        yield key, files


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class _ShardStream:
    """A forward-only read position in one shard; reopened only when asked to go back."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.next = 0
        self.it: Iterator[tuple[str, dict[str, bytes]]] | None = None

    def read(self, path: Path, lo: int, hi: int) -> list[tuple[str, dict[str, bytes]]]:
        if self.it is None or path != self.path or lo < self.next:
            self.path, self.next, self.it = path, 0, _iter_tar(path)
        out = []
        for key, files in self.it:
            self.next += 1
            if self.next - 1 >= lo:
                out.append((key, files))
            if self.next >= hi:
                break
        if len(out) != hi - lo:
            raise ValueError(f"{path}: expected samples [{lo}, {hi}) but the shard ends at {self.next}; "
                             f"the shard or its {INDEX_NAME} is out of date, rewrite the shards")
        return out


@dataclass(kw_only=True)
class PackedBatch:
    """Packed rows, all (B, T): inputs, next-token targets, rotary positions, segment ids
    (document piece per token), per-target loss weight (0 = no loss) and target modality tag."""

    ids: Tensor
    targets: Tensor
    positions: Tensor
    segment_ids: Tensor
    loss_weight: Tensor
    modality: Tensor

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})

    @property
    def n_loss_tokens(self) -> int:
        return int((self.loss_weight > 0).sum())


class TokenShardReader:
    """Reads a token-shard folder (or one ``.tar``) as an endless (``loop=True``) or
    single-pass stream of packed rows; see the module docstring for the exact order.

    ``expected_manifest_hash``: the model's manifest hash; shards made with another are
    refused. ``state_dict()`` / ``load_state_dict()`` save and restore the position.
    """

    def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike], *, seq_len: int,
                 expected_manifest_hash: str | None = None, seed: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 1024, loop: bool = True) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 1 (documents per shuffle window)")
        self.seq_len, self.seed, self.shuffle, self.buffer, self.loop = seq_len, seed, shuffle, shuffle_buffer, loop
        self.shards, self.counts, self.index = self._open(path)
        self.manifest_hash: str = self.index["manifest_hash"]
        if expected_manifest_hash is not None and expected_manifest_hash != self.manifest_hash:
            raise ShardManifestError(
                f"token shards {describe_sources(path)} were made with manifest {self.manifest_hash}, but the "
                f"model uses manifest {expected_manifest_hash}; their ids mean different tokens. Re-tokenize the data "
                f"with the model's vocabulary (or train the model that matches these shards)")
        self.modalities: list[str] | None = self.index.get("modalities")
        self.n_docs = sum(self.counts)
        self.epoch = self.cursor = self.offset = 0
        self._window: tuple[int, int, list[TokenDoc]] | None = None  # (epoch, window, docs in read order)
        self._stream = _ShardStream()

    # ---- opening ----

    @staticmethod
    def _open(path: Any) -> tuple[list[Path], list[int], dict[str, Any]]:
        """One folder, one ``.tar``, or a list of folders and ``.tar`` files read as one
        corpus (in the order given; shuffling mixes them). All must share one manifest."""
        sources = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        if not sources:
            raise ValueError("no shards given; pass a token-shard folder or .tar files")
        paths: list[Path] = []
        counts: list[int] = []
        tokens: list[int] = []
        indexes: list[tuple[str, dict[str, Any]]] = []
        for src in sources:
            if Path(src).is_dir():
                folder, index = Path(src), TokenShardReader._folder_index(Path(src))
                paths += [folder / s["name"] for s in index["shards"]]
                counts += [s["docs"] for s in index["shards"]]
                tokens += [s.get("tokens", 0) for s in index["shards"]]
                indexes.append((str(folder), index))
                continue
            p = Path(src)
            if not p.is_file():
                raise ValueError(f"{p}: no such shard or folder; pass token-shard folders or existing .tar files")
            index = TokenShardReader._tar_index(p)
            paths.append(p)
            counts.append(index["docs"])
            tokens.append(index["tokens"])
            indexes.append((str(p), index))
        seen: dict[Path, int] = {}
        for i, p in enumerate(paths):
            j = seen.setdefault(p.resolve(), i)
            if j != i:
                raise ValueError(f"shard {p} is given twice (also as {paths[j]}); its documents would be trained "
                                 f"on twice per epoch. Pass each shard folder or .tar file once")
        found = {idx["manifest_hash"] for _, idx in indexes if idx["manifest_hash"] is not None}
        if not found:
            raise ValueError(f"{', '.join(name for name, _ in indexes)} hold no documents; tokenize some data first")
        if len(found) != 1:
            listing = ", ".join(f"{name} ({idx['manifest_hash'] or 'no documents'})" for name, idx in indexes)
            raise ShardManifestError(f"the shards mix manifests: {listing}; their ids mean different tokens. "
                                     f"Train on shards of one vocabulary (re-tokenize the odd ones out)")
        # sources of one manifest share its vocabulary and modalities: take them from any index that records them
        recorded = [idx for _, idx in indexes]
        merged: dict[str, Any] = {
            **(indexes[0][1] if len(indexes) == 1 else {}), "manifest_hash": found.pop(), "docs": sum(counts),
            "modalities": next((idx["modalities"] for idx in recorded if idx.get("modalities")), None),
            "vocab_size": next((idx["vocab_size"] for idx in recorded if idx.get("vocab_size") is not None), None),
            "max_id": max(idx.get("max_id", -1) for idx in recorded),
            "fingerprint": hashlib.sha256(json.dumps([counts, tokens]).encode()).hexdigest()[:16]}
        return paths, counts, merged

    @staticmethod
    def _tar_index(p: Path) -> dict[str, Any]:
        """What a folder's index says, read off one loose ``.tar`` (every sample is read)."""
        n, n_tokens, max_id, hashes = 0, 0, -1, set()
        try:
            for key, files in _iter_tar(p):
                if "meta.json" not in files or "ids.npy" not in files:
                    raise ValueError(f"{p}: sample {key!r} has no meta.json/ids.npy; it is not a token shard "
                                     f"written by write_token_shards (or `tessera tokenize`)")
                hashes.add(json.loads(files["meta.json"])["manifest_hash"])
                ids = _load_npy(files["ids.npy"])
                n, n_tokens, max_id = n + 1, n_tokens + len(ids), max(max_id, int(ids.max()) if len(ids) else -1)
        except tarfile.TarError as e:
            raise ValueError(f"{p} is not a readable .tar ({e}); pass token-shard folders or the .tar files "
                             f"that write_token_shards wrote") from e
        if len(hashes) > 1:
            raise ShardManifestError(f"shard {p} mixes manifests {sorted(hashes)}; train on shards of one "
                                     f"vocabulary")
        return {"manifest_hash": hashes.pop() if hashes else None, "docs": n, "tokens": n_tokens, "max_id": max_id}

    @staticmethod
    def _folder_index(folder: Path) -> dict[str, Any]:
        if not (folder / INDEX_NAME).is_file():
            raise ValueError(f"{folder} has no {INDEX_NAME}; it is not a token-shard folder written by "
                             f"write_token_shards (or `tessera tokenize`); write the shards first")
        index = load_json(folder / INDEX_NAME)
        if index.get("format") != _FORMAT:
            raise ValueError(f"{folder / INDEX_NAME} is not a Tessera token-shard index "
                             f"(format={index.get('format')!r})")
        return index

    # ---- position ----

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "seed": self.seed, "seq_len": self.seq_len, "shuffle": self.shuffle,
                "shuffle_buffer": self.buffer, "n_docs": self.n_docs, "epoch": self.epoch,
                "cursor": self.cursor, "offset": self.offset, "fingerprint": self.index["fingerprint"]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k in ("seed", "seq_len", "shuffle", "shuffle_buffer", "n_docs"):
            if state.get(k) != getattr(self, {"shuffle_buffer": "buffer"}.get(k, k)):
                raise ValueError(f"reader state has {k}={state.get(k)!r} but this reader has "
                                 f"{getattr(self, {'shuffle_buffer': 'buffer'}.get(k, k))!r}; resume with the "
                                 f"same data and data settings as the saved run")
        saved = state.get("fingerprint")  # absent in states saved before it was recorded
        if saved is not None and saved != self.index["fingerprint"]:
            raise ValueError(f"reader state was saved on other shards (fingerprint {saved}, these are "
                             f"{self.index['fingerprint']}: documents and tokens per shard, in the order given); "
                             f"resume with the same --data sources in the same order as the saved run")
        self.epoch, self.cursor, self.offset = int(state["epoch"]), int(state["cursor"]), int(state["offset"])

    # ---- document order ----

    def _shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(f"shards:{self.seed}:{epoch}").shuffle(order)
        return order

    def _window_docs(self, epoch: int, w: int) -> list[TokenDoc]:
        """Documents [w*B, (w+1)*B) of the epoch's shard order, in read order."""
        lo, hi = w * self.buffer, min(self.n_docs, (w + 1) * self.buffer)
        docs: list[TokenDoc] = []
        start = 0
        for s in self._shard_order(epoch):
            n = self.counts[s]
            a, b = max(lo, start) - start, min(hi, start + n) - start
            if a < b:
                for key, files in self._stream.read(self.shards[s], a, b):
                    docs.append(self._decode(self.shards[s], key, files))
            start += n
        return docs

    def _decode(self, shard: Path, key: str, files: dict[str, bytes]) -> TokenDoc:
        missing = [name for name in ("meta.json", "ids.npy", "mask.npy") if name not in files]
        if missing:
            raise ValueError(f"{shard} sample {key!r} has no {', '.join(missing)}; it is not a token shard written "
                             f"by write_token_shards (or `tessera tokenize`): rewrite that shard")
        try:
            meta = json.loads(files["meta.json"])
            ids = _load_npy(files["ids.npy"]).astype(np.int64)
            mask = _load_npy(files["mask.npy"]).astype(np.float32)
            weight = mask * _load_npy(files["weight.npy"]) if "weight.npy" in files else mask
        except (ValueError, OSError, EOFError) as e:  # bad JSON, a truncated or non-numeric .npy, mismatched shapes
            raise ValueError(f"{shard} sample {key!r} is corrupt ({type(e).__name__}: {e}); rewrite that "
                             f"shard") from e
        if not isinstance(meta, dict) or "manifest_hash" not in meta:
            raise ValueError(f"{shard} sample {key!r}: its meta.json {meta!r} has no manifest_hash; rewrite that "
                             f"shard with write_token_shards (or `tessera tokenize`)")
        if meta["manifest_hash"] != self.manifest_hash:
            raise ShardManifestError(f"{shard} sample {key} was made with manifest {meta['manifest_hash']}, "
                                     f"the shards' index says {self.manifest_hash}; rewrite the shards")
        if ids.ndim != 1 or mask.shape != ids.shape or weight.shape != ids.shape:
            raise ValueError(f"{shard} sample {key!r}: ids {ids.shape}, mask {mask.shape} and weight "
                             f"{weight.shape} must be one 1-D length; rewrite that shard")
        if "modality.npy" in files and self.modalities:
            tags = _load_npy(files["modality.npy"])
            if len(tags) and int(tags.max()) > len(self.modalities):
                raise ValueError(f"{shard} sample {key} tags a token with modality {int(tags.max())}, but the "
                                 f"shards' index names {len(self.modalities)} modalities {self.modalities}; "
                                 f"the shard or its {INDEX_NAME} is out of date, rewrite the shards")
        else:  # no modality names to weigh by (shards written without a manifest, or loose .tar files only)
            tags = np.zeros(len(ids), np.uint8)
        return TokenDoc(ids=ids, loss_weight=weight, modality=tags)

    def _doc(self, epoch: int, cursor: int) -> TokenDoc:
        w, j = divmod(cursor, self.buffer)
        if self._window is None or self._window[:2] != (epoch, w):
            docs = self._window_docs(epoch, w)
            if self.shuffle:
                perm = list(range(len(docs)))
                random.Random(f"window:{self.seed}:{epoch}:{w}").shuffle(perm)
                docs = [docs[p] for p in perm]
            self._window = (epoch, w, docs)
        return self._window[2][j]

    # ---- packing ----

    def rows(self) -> Iterator[dict[str, np.ndarray]]:
        """Packed rows of ``seq_len + 1`` tokens; the reader's state after each row is
        the position of the next one. A single pass pads its last row (weight 0)."""
        L = self.seq_len + 1
        while True:
            tok = np.zeros(L, np.int64)
            pos = np.zeros(L, np.int64)
            seg = np.zeros(L, np.int64)
            wgt = np.zeros(L, np.float32)
            tag = np.zeros(L, np.int64)
            fill = n_seg = 0
            while fill < L:
                if self.cursor >= self.n_docs:
                    if not self.loop:
                        break
                    self.epoch, self.cursor, self.offset = self.epoch + 1, 0, 0
                doc = self._doc(self.epoch, self.cursor)
                if len(doc) < 2:  # nothing to predict in a one-token document
                    self.cursor, self.offset = self.cursor + 1, 0
                    continue
                n = min(L - fill, len(doc) - self.offset)
                sl, out = slice(self.offset, self.offset + n), slice(fill, fill + n)
                tok[out], wgt[out], tag[out] = doc.ids[sl], doc.loss_weight[sl], doc.modality[sl]
                pos[out], seg[out] = np.arange(n), n_seg
                fill, n_seg = fill + n, n_seg + 1
                if self.offset + n >= len(doc):
                    self.cursor, self.offset = self.cursor + 1, 0
                else:  # continue the document in the next row, one token early
                    self.offset += n - 1
            if fill == 0:
                return
            seg[fill:] = n_seg  # padding of a final single-pass row: its own segment, no loss
            yield {"tokens": tok, "positions": pos, "segments": seg, "weights": wgt, "tags": tag}
            if fill < L:
                return

    @staticmethod
    def collate(rows: Sequence[dict[str, np.ndarray]]) -> PackedBatch:
        tok = torch.from_numpy(np.stack([r["tokens"] for r in rows]))
        seg = torch.from_numpy(np.stack([r["segments"] for r in rows]))
        same = (seg[:, 1:] == seg[:, :-1]).float()  # a target in another segment is not predicted
        return PackedBatch(
            ids=tok[:, :-1], targets=tok[:, 1:],
            positions=torch.from_numpy(np.stack([r["positions"] for r in rows]))[:, :-1],
            segment_ids=seg[:, :-1],
            loss_weight=torch.from_numpy(np.stack([r["weights"] for r in rows]))[:, 1:] * same,
            modality=torch.from_numpy(np.stack([r["tags"] for r in rows]))[:, 1:],
        )

    def batches(self, batch_size: int) -> Iterator[PackedBatch]:
        """Batches of packed rows (the last one of a single pass may be smaller)."""
        rows: list[dict[str, np.ndarray]] = []
        for row in self.rows():
            rows.append(row)
            if len(rows) == batch_size:
                yield self.collate(rows)
                rows = []
        if rows:
            yield self.collate(rows)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: no open file handles
        return {**self.__dict__, "_window": None, "_stream": _ShardStream()}


class _StepDataset(torch.utils.data.IterableDataset):
    """One item per optimizer step: this rank's micro-batches and the reader state after
    the step. Worker k of K keeps steps k, k+K, ... (see the module docstring)."""

    def __init__(self, reader: TokenShardReader, micro_batch: int, grad_accum: int, rank: int,
                 world_size: int) -> None:
        self.reader, self.mb, self.ga, self.rank, self.world = reader, micro_batch, grad_accum, rank, world_size

    def __iter__(self) -> Iterator[tuple[list[PackedBatch], dict[str, Any]]]:
        info = torch.utils.data.get_worker_info()
        k, K = (info.id, info.num_workers) if info is not None else (0, 1)
        per_step = self.mb * self.ga * self.world
        rows: list[dict[str, np.ndarray]] = []
        step = 0
        for row in self.reader.rows():
            rows.append(row)
            if len(rows) < per_step:
                continue
            if step % K == k:
                micro = []
                for a in range(self.ga):
                    start = (a * self.world + self.rank) * self.mb
                    micro.append(TokenShardReader.collate(rows[start : start + self.mb]))
                yield micro, self.reader.state_dict()
            rows, step = [], step + 1


def step_batches(reader: TokenShardReader, *, micro_batch: int, grad_accum: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0) -> Iterator[tuple[list[PackedBatch], dict[str, Any]]]:
    """Per optimizer step: ``grad_accum`` micro-batches of ``micro_batch`` rows for this
    rank, and the reader state to save so a resumed run starts at the next step.
    Load a saved state into ``reader`` before calling."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    ds = _StepDataset(reader, micro_batch, grad_accum, rank, world_size)
    if num_workers == 0:
        return iter(ds)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers,
                                         persistent_workers=False)
    return iter(loader)
