"""The on-disk folder of a trained tokenizer, shared by every tokenizer plugin.

A tokenizer folder holds two files:

* ``config.json`` — ``{"format": VERSION, CONFIG_KEY: model config, "spec": ModalitySpec}``;
  ``CONFIG_KEY`` is the plugin's name for its model config (``"model"``, ``"codec"``, ...)
  and ``"format"`` is left out by plugins whose shipped folders predate it;
* ``model.safetensors`` — the model's ``state_dict`` (never a pickle).

Plugins keep their own ``save``/``load``/``pretrained`` methods and call these functions:

    save_tokenizer_folder(path, state=model.state_dict(), config_key="model",
                          config=cfg.to_dict(), spec=self.spec, format_version="1")
    config, state = read_tokenizer_folder(path, config_key="model", format_version="1")
    load_weights(model, state, path)
    folder = pretrained_folder(WEIGHTS_DIR, modality="video", hint="see weights/README.md")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, load_json, load_tensors, save_json, save_tensors
from .spec import ModalitySpec

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "MissingCheckpointError",
    "save_tokenizer_folder",
    "read_tokenizer_folder",
    "load_weights",
    "pretrained_folder",
    "half_precision_state",
]

M = TypeVar("M", bound=nn.Module)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A tokenizer folder (or a plugin's shipped weights) is not there."""


def save_tokenizer_folder(
    path: str | os.PathLike,
    *,
    state: dict[str, Tensor],
    config_key: str,
    config: dict[str, Any],
    spec: ModalitySpec,
    format_version: str | None,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``path`` (created if needed);
    ``format_version=None`` writes no ``"format"`` entry. Returns the folder."""
    if config_key in ("format", "spec"):
        raise ValueError(f"config_key={config_key!r} clashes with a reserved entry of config.json; use e.g. 'model'")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / WEIGHTS_FILE, state)
    meta: dict[str, Any] = {} if format_version is None else {"format": format_version}
    save_json(folder / CONFIG_FILE, {**meta, config_key: config, "spec": spec.to_dict()})
    return folder


def read_tokenizer_folder(
    path: str | os.PathLike, *, config_key: str, format_version: str | None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read a folder written by :func:`save_tokenizer_folder`: ``(model config dict, state)``.

    Raises :class:`MissingCheckpointError` when a file is missing and
    :class:`~tessera.core.checkpoint.CheckpointError` when the format differs from
    ``format_version`` (``None``: the folder must carry no format) or the config is absent."""
    folder = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise MissingCheckpointError(
                f"{folder}/{name}: no such file; a tokenizer folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                f"(written by the tokenizer's save)"
            )
    meta = load_json(folder / CONFIG_FILE)
    if not isinstance(meta, dict) or meta.get("format") != format_version:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(
            f"{folder}/{CONFIG_FILE} has format {found!r}, this version reads {format_version!r}; "
            f"re-save the tokenizer with this version of Tessera"
        )
    if not isinstance(meta.get(config_key), dict):
        raise CheckpointError(
            f"{folder}/{CONFIG_FILE} has no {config_key!r} object (it has {sorted(meta)}); "
            f"is this a folder of another modality's tokenizer?"
        )
    return meta[config_key], load_tensors(folder / WEIGHTS_FILE)


def load_weights(module: M, state: dict[str, Tensor], folder: str | os.PathLike) -> M:
    """``module.load_state_dict(state)`` (strict), in eval mode; a mismatch raises
    :class:`~tessera.core.checkpoint.CheckpointError` naming the folder."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}/{WEIGHTS_FILE} does not match {CONFIG_FILE} ({e})") from e
    module.eval()
    return module


@torch.no_grad()
def half_precision_state(module: nn.Module, *, keep: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Round ``module``'s floating-point parameters and buffers to fp16 *in place* and
    return its state dict with those tensors stored as fp16 (half the file). The module
    keeps its dtype (fp32 values that fp16 holds exactly), so it is bit-identical to what
    :func:`load_weights` makes of the saved file — same outputs, same fingerprint. Tensors
    whose names start with a prefix in ``keep`` stay as they are (e.g. a frozen copy of
    another tokenizer that must keep coding exactly like it).

    Refuses a module with a value fp16 cannot hold (beyond ±65504, or NaN), naming it."""
    state = {name: t for name, t in module.state_dict().items() if not name.startswith(keep)}
    kept = {name: t for name, t in module.state_dict().items() if name.startswith(keep)}
    for name, t in state.items():
        if t.is_floating_point() and t.numel() and not bool(t.abs().max() <= torch.finfo(torch.float16).max):
            raise ValueError(
                f"half_precision_state: {name} holds values fp16 cannot store (max |x| = {float(t.abs().max()):g}, "
                f"fp16 max 65504); save it in full precision"
            )
    for t in state.values():
        if t.is_floating_point():
            t.copy_(t.half())
    return {**{name: t.half() if t.is_floating_point() else t for name, t in state.items()}, **kept}


def pretrained_folder(weights_dir: str | os.PathLike, *, modality: str, hint: str) -> Path:
    """The shipped checkpoint folder of a plugin, or :class:`MissingCheckpointError`
    (also a ``FileNotFoundError``) with ``hint`` saying how to make one."""
    folder = Path(weights_dir)
    if not (folder / CONFIG_FILE).is_file():
        raise MissingCheckpointError(f"{folder}: no shipped {modality} checkpoint; {hint}")
    return folder
