"""Pieces every training loop in Tessera shares (tokenizers of every modality, and the
LLM outside DeepSpeed): a JSONL metrics log, resumable training state in safetensors +
JSON (never pickle), seeding, a warmup + cosine learning-rate schedule and the check
that a config's counts are at least one.

A training state folder holds ``model.safetensors``, ``optimizer.safetensors`` and
``state.json`` (step, optimizer hyper-parameters, anything the loop wants to resume).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import load_json, load_tensors, save_json, save_tensors

__all__ = [
    "MetricsLog",
    "seed_everything",
    "optimizer_to_tensors",
    "optimizer_from_tensors",
    "save_training_state",
    "load_training_state",
    "warmup_cosine",
    "check_at_least_one",
]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


class MetricsLog:
    """Append-only JSONL log: one JSON object per line, each with ``step`` and ``time``.
    Lines are flushed as written so a killed run keeps everything it logged."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)

    def log(self, step: int, **metrics: Any) -> None:
        row = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in metrics.items():
            if isinstance(v, Tensor):
                v = v.item() if v.numel() == 1 else v.tolist()
            row[k] = v
        self._f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict[str, Any]]:
        rows = []
        for line in Path(path).read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a run killed mid-line leaves one partial last line
        return rows


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer's state dict into tensors (for safetensors) and JSON."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    meta = {"param_groups": sd["param_groups"], "scalars": scalars}
    return tensors, meta


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_state(
    folder: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write model, optimizer and loop state to ``folder`` (each file atomically;
    ``state.json`` last, so a folder with a ``state.json`` is complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / "model.safetensors", model.state_dict())
    meta: dict[str, Any] = {"step": int(step), "extra": extra or {}}
    if optimizer is not None:
        tensors, opt_meta = optimizer_to_tensors(optimizer)
        save_tensors(folder / "optimizer.safetensors", tensors)
        meta["optimizer"] = opt_meta
    save_tensors(folder / "rng.safetensors", {"torch": torch.get_rng_state()})
    save_json(folder / "state.json", meta)


def load_training_state(
    folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote; returns ``{"step", "extra"}``."""
    folder = Path(folder)
    meta = load_json(folder / "state.json")
    model.load_state_dict(load_tensors(folder / "model.safetensors"))
    if optimizer is not None and "optimizer" in meta:
        optimizer_from_tensors(optimizer, load_tensors(folder / "optimizer.safetensors"), meta["optimizer"])
    rng = folder / "rng.safetensors"
    if rng.exists():
        torch.set_rng_state(load_tensors(rng)["torch"])
    return {"step": meta["step"], "extra": meta.get("extra", {})}


def warmup_cosine(step: int, *, warmup: int, steps: int, floor: float) -> float:
    """Learning-rate multiplier at ``step`` (from 0): linear warmup to 1 over ``warmup``
    steps, then a half cosine from 1 down to ``floor`` at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def check_at_least_one(config: object, names: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the first field of ``config`` among ``names`` below 1."""
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"{type(config).__name__}.{name}={value} must be >= 1; use a positive count")
