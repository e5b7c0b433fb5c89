"""Checkpoint I/O: safetensors for tensors, JSON for configs, atomic writes, sha256.

Nothing here (or anywhere in Tessera) loads weights with pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "atomic_write_bytes",
    "save_json",
    "load_json",
    "save_tensors",
    "load_tensors",
    "sha256_file",
    "sha256_tensors",
    "CheckpointError",
]


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not match what was expected."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new
    one, never half of it: temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; check the path (expected a JSON config)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is corrupt, re-save it") from e


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> str:
    """Atomically save ``tensors`` as safetensors; returns the file's sha256.

    Tensors are made contiguous and moved to the CPU; shared storage is copied.
    """
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    data = save(flat, metadata=dict(metadata) if metadata else None)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_tensors(
    path: str | os.PathLike, device: str | torch.device = "cpu", expected_sha256: str | None = None
) -> dict[str, Tensor]:
    """Load a safetensors file (never pickle). If ``expected_sha256`` is given, the
    file's hash must match it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; expected a .safetensors checkpoint")
    data = path.read_bytes()
    if expected_sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != expected_sha256:
            raise CheckpointError(
                f"{path}: sha256 is {got[:16]}…, expected {expected_sha256[:16]}…; the weights are "
                f"not the ones this manifest/bundle was built with. Rebuild the manifest or restore "
                f"the original file"
            )
    try:
        out = load(data)
    except (SafetensorError, Exception) as e:  # safetensors raises several types on corrupt input
        raise CheckpointError(f"{path}: not a valid safetensors file ({e}); the file is corrupt") from e
    return {k: v.to(device) for k, v in out.items()}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tensors(tensors: Mapping[str, Tensor]) -> str:
    """A fingerprint of a state dict that does not depend on file layout: sha256 over
    sorted names, dtypes, shapes and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
