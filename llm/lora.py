"""LoRA fine-tuning of a TesseraLM through peft (Hu et al., "LoRA: Low-Rank Adaptation of
Large Language Models", 2021).

``apply_lora`` injects low-rank adapters into the model's linear layers in place (the
model stays a ``TesseraLM``, so DeepSpeed wraps it like any other) and freezes everything
else; ``merge_lora`` folds ``W + (alpha / r) * B @ A`` into the base weights and removes
the adapters, giving a plain ``TesseraLM`` that ``save_pretrained`` writes as usual.
Adapters alone are saved with ``save_adapter`` (safetensors + JSON, never pickle).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from ..core.checkpoint import save_json, save_tensors

__all__ = ["LoraOptions", "apply_lora", "merge_lora", "adapter_state", "save_adapter"]

# The linear layers of llm/model.py: fused q/k/v, attention output, fused SwiGLU gate/up, down.
_LINEARS = ("qkv", "proj", "gate_up", "down")


@dataclass(kw_only=True)
class LoraOptions:
    """Rank ``r``, scale ``alpha / r``, dropout on the adapter input, and which linear
    layers (by module name suffix) get adapters."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = _LINEARS

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.r < 1:
            raise ValueError(f"LoRA r={self.r} must be >= 1 (the adapter rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout} must be in [0, 1)")
        unknown = sorted(set(self.target_modules) - set(_LINEARS))
        if unknown or not self.target_modules:
            raise ValueError(f"LoRA target_modules {list(self.target_modules)}: {unknown or 'empty'}; the "
                             f"TesseraLM linear layers are {list(_LINEARS)}")

    @classmethod
    def debug(cls) -> LoraOptions:
        return cls(r=4, alpha=8.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraOptions:
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown LoRA options {sorted(set(d) - known)}; known: {sorted(known)}")
        return cls(**d)


def apply_lora(model: nn.Module, options: LoraOptions) -> nn.Module:
    """Inject adapters into ``model`` in place; only adapter weights stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=list(options.target_modules))
    return inject_adapter_in_model(config, model)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the plain layer back; returns ``model``."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "drop_decode_copies"):  # merge() wrote through weight.data: no version bump
        model.drop_decode_copies()
    return model


def adapter_state(state: dict[str, Any]) -> dict[str, Any]:
    """The adapter tensors of a (peft-injected) state dict."""
    return {k: v for k, v in state.items() if ".lora_" in k}


def save_adapter(state: dict[str, Any], options: LoraOptions, folder: str | os.PathLike, *,
                 manifest_hash: str) -> None:
    """adapter.safetensors (adapter tensors only) + adapter_config.json."""
    folder = Path(folder)
    save_tensors(folder / "adapter.safetensors", adapter_state(state), metadata={"manifest_hash": manifest_hash})
    save_json(folder / "adapter_config.json", {**options.to_dict(), "manifest_hash": manifest_hash})
