"""Export a Tessera LLM as a Hugging Face ``LlamaForCausalLM`` folder.

Our decoder is the Llama architecture (Touvron et al., 2023) with two fused matrices
(``attn.qkv`` and ``mlp.gate_up``); the exporter splits them into HF's ``q_proj``,
``k_proj``, ``v_proj`` and ``gate_proj``, ``up_proj``. Our rotary embedding already uses
HF's rotate-half layout, so query/key weights are copied without permutation. The
folder then loads in ``transformers`` (and any Llama-compatible server) with the same
logits as ours; the Tessera manifest and the sentencepiece model travel with it so the
ids can be interpreted (the sentencepiece model covers only the text ids).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.checkpoint import save_json, save_tensors
from ..core.vocab import ManifestMismatchError
from .model import TesseraLM

__all__ = ["export_hf", "hf_state_dict", "hf_config"]


def hf_config(model: TesseraLM, *, manifest: dict[str, Any] | None = None,
              dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of the equivalent ``LlamaForCausalLM``."""
    c = model.config
    specials = (manifest or {}).get("specials", {})
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        # transformers >= 5 reads rope_parameters; older versions read rope_theta
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "rope_theta": c.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": c.init_std,
        "bos_token_id": specials.get("<|bos|>"),
        "eos_token_id": specials.get("<|eos|>"),
        "pad_token_id": specials.get("<|pad|>"),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def hf_state_dict(model: TesseraLM, *, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Our parameters under HF Llama names, fused matrices split."""
    c = model.config
    q_size, kv_size = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    out = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm.weight}
    if not c.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split([q_size, kv_size, kv_size], dim=0)
        gate, up = block.mlp.gate_up.weight.chunk(2, dim=0)
        out |= {
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.attn.proj.weight,
            p + "post_attention_layernorm.weight": block.mlp_norm.weight,
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": block.mlp.down.weight,
        }
    return {k: v.detach().to(dtype) for k, v in out.items()}


def export_hf(model_folder_or_model: str | os.PathLike | TesseraLM, out_dir: str | os.PathLike, *,
              manifest: dict[str, Any] | None, sentencepiece_model: str | os.PathLike | None,
              dtype: torch.dtype = torch.float32) -> Path:
    """Write ``out_dir`` with config.json, model.safetensors (HF names), manifest.json and
    tokenizer.model; returns the folder. A model whose stored manifest hash differs from
    ``manifest["hash"]`` is refused (its ids would be read with the wrong vocabulary)."""
    model = (model_folder_or_model if isinstance(model_folder_or_model, TesseraLM)
             else TesseraLM.from_pretrained(model_folder_or_model))
    if manifest is not None:
        if manifest.get("size", model.config.vocab_size) != model.config.vocab_size:
            raise ManifestMismatchError(
                f"the manifest has {manifest['size']} ids but the model's vocabulary has "
                f"{model.config.vocab_size}; export the model with the manifest it was trained with")
        if model.manifest_hash is not None and manifest.get("hash") != model.manifest_hash:
            raise ManifestMismatchError(
                f"the model was trained with manifest {model.manifest_hash}, the given manifest is "
                f"{manifest.get('hash')}; export the model with the manifest it was trained with")
    if sentencepiece_model is not None and not Path(sentencepiece_model).is_file():
        raise FileNotFoundError(f"sentencepiece model {sentencepiece_model} does not exist; pass the "
                                f"bundle's tokenizer .model file or None")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "model.safetensors", hf_state_dict(model, dtype=dtype), metadata={"format": "pt"})
    save_json(out / "config.json", hf_config(model, manifest=manifest, dtype=dtype))
    if manifest is not None:
        save_json(out / "manifest.json", manifest)
    if sentencepiece_model is not None:
        shutil.copyfile(sentencepiece_model, out / "tokenizer.model")
    return out
