"""Training the Tessera LLM through DeepSpeed (Rajbhandari et al., "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models", 2020), from scratch or from a
saved model, fully or with LoRA adapters.

Training always goes through ``deepspeed.initialize``. Without a launcher, one process
initialises itself (``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
defaults, gloo on the CPU); under the ``deepspeed`` launcher the same code runs on many
GPUs or nodes unchanged. The model knows nothing of DeepSpeed: :func:`train` wraps it.

Loss. Cross-entropy in fp32 on every target token, times its weight (loss mask x
per-token weight x per-modality weight), divided by the summed weight of the *whole*
optimizer step (all micro-batches, all ranks). The token count is all-reduced before
the first backward, and each micro-batch loss is pre-multiplied by ``world_size x
grad_accum`` to undo DeepSpeed's averaging, so the gradient is the same token-weighted
mean however the global batch is split across processes and micro-steps.

Schedule. Linear warmup to ``lr``, cosine decay to ``min_lr`` at ``max_steps``; set on
the optimizer's param groups before every step (no scheduler object to checkpoint).

Checkpoints (``OUT/checkpoints/step_XXXXXXXX``). DeepSpeed's own files for exact resume,
plus ``tessera_state.json`` (step, data reader position, tokens seen). The ``latest``
file is written last and atomically, so a run killed at any moment resumes from the last
complete checkpoint. DeepSpeed reads its files with ``torch.load``; Tessera swaps in a
checkpoint engine that loads them with ``weights_only=True``, allowing only the three
DeepSpeed classes its optimizer states contain, so resuming never unpickles code.
At the end, the consolidated model goes to ``OUT/model`` (``TesseraLM.save_pretrained``:
safetensors + config.json + manifest hash); with LoRA, merged, and the adapters alone
to ``OUT/adapter``. Fine-tuning a bundle (``init_from`` = a bundle folder; the shards must
carry its manifest hash) also writes a copy of the bundle with the trained LLM to
``OUT/bundle`` (or ``out_bundle``), ready for ``load_bundle`` and ``tessera generate``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.checkpoint import CheckpointError, atomic_write_bytes, load_json, save_json
from ..core.training import MetricsLog, seed_everything
from .data import PackedBatch, TokenShardReader, describe_sources, step_batches
from .lora import LoraOptions, apply_lora, merge_lora, save_adapter
from .model import LLMConfig, TesseraLM

__all__ = ["TrainConfig", "train", "main", "init_distributed", "deepspeed_config"]

_PRECISIONS = ("fp32", "bf16")
_CKPT = "checkpoints"
_STATE = "tessera_state.json"


@dataclass(kw_only=True)
class TrainConfig:
    """Everything one training run needs; JSON-serialisable (``to_dict``/``from_dict``).

    The global batch is ``micro_batch x grad_accum x world_size`` packed rows of
    ``seq_len`` tokens; give ``global_batch`` to have that checked up front.
    """

    data: str | list[str]  # token-shard folder, or several read as one corpus (llm/data.py)
    out_dir: str
    model: str = "debug"  # LLMConfig preset, used when neither model_config nor init_from is given
    model_config: dict[str, Any] | None = None  # a full LLMConfig dict
    init_from: str | None = None  # a saved TesseraLM folder or a bundle folder to continue from (fine-tuning)
    out_bundle: str | None = None  # init_from a bundle: where its copy with the trained LLM goes (default OUT/bundle)
    vocab_size: int | None = None  # default: the shards' vocabulary size
    eval_data: str | None = None
    seq_len: int | None = None  # default: the model's max_seq_len
    micro_batch: int = 4
    grad_accum: int = 1
    global_batch: int | None = None
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    max_steps: int = 1000
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    precision: str = "fp32"  # "fp32" or "bf16"
    zero_stage: int = 0  # picks llm/configs/zero{stage}.json unless deepspeed_config is given
    deepspeed_config: str | None = None  # path to a DeepSpeed JSON config
    eval_every: int = 0  # steps; 0 = only at the end (when eval_data is given)
    eval_batches: int = 8
    save_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    loss_weights: dict[str, float] = field(default_factory=dict)  # "text" or a modality name -> weight
    seed: int = 0
    shuffle_buffer: int = 1024
    num_workers: int = 0
    lora: LoraOptions | None = None
    resume: bool = True  # continue from OUT/checkpoints/latest when it exists
    progress: bool = True
    compile: bool = False  # torch.compile the model's forward in place (Module.compile): state dict unchanged

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if isinstance(self.lora, dict):
            self.lora = LoraOptions.from_dict(self.lora)
        for name in ("micro_batch", "grad_accum", "max_steps", "eval_batches", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "eval_every", "save_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 0")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; choose one of {list(_PRECISIONS)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage}; DeepSpeed ZeRO stages are 0, 1, 2, 3")
        if not 0 < self.lr or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"lr={self.lr}, min_lr={self.min_lr}: need 0 < lr and 0 <= min_lr <= lr")
        if self.clip < 0:
            raise ValueError(f"clip={self.clip} must be >= 0 (0 disables clipping)")
        bad = {k: v for k, v in self.loss_weights.items() if not v >= 0}
        if bad:
            raise ValueError(f"loss_weights {bad} must be >= 0")

    @classmethod
    def debug(cls, *, data: str, out_dir: str, **overrides: Any) -> TrainConfig:
        """A few seconds on a CPU: the debug model, short rows, a handful of steps."""
        base = dict(model="debug", seq_len=64, micro_batch=4, max_steps=20, warmup_steps=2, lr=3e-3,
                    min_lr=3e-4, eval_batches=2, shuffle_buffer=64, progress=False)
        return cls(data=data, out_dir=out_dir, **{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["lora"] = self.lora.to_dict() if self.lora is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


# ---- distributed set-up ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size).

    Without a launcher, one process sets the rendezvous variables itself. On the CPU the
    backend is gloo, and DeepSpeed's shared-memory allreduce op (a C++ extension compiled
    on first use, ~70 s) is skipped unless ``TESSERA_DS_SHM=1``: gloo alone is correct.
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized() and "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
                          RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if not dist.is_initialized():
        atexit.register(_destroy_process_group)
    cpu = get_accelerator().device_name() == "cpu"
    if cpu and os.environ.get("TESSERA_DS_SHM") != "1":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo" if cpu else get_accelerator().communication_backend_name(),
                               verbose=False)
    return dist.get_rank(), dist.get_world_size()


def _destroy_process_group(timeout_s: float = 60.0) -> None:
    """Tear down the process group this process opened, before interpreter shutdown.

    Left to C++ static destruction, gloo's threads were once destroyed still joinable on
    a rank whose peer had already exited ("terminate called without an active
    exception", exit -6) although the run itself had finished. The ranks first meet at a
    barrier so that none tears its group down while a peer still talks to it (rank 0 also
    hosts the rendezvous store); under gloo the barrier gives up after ``timeout_s`` (a
    minute), so a peer that died leaves this rank to exit, not to hang.
    """
    import datetime

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1 and dist.get_backend() == "gloo":
            try:
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
            except RuntimeError as e:  # a peer is gone: nothing left to wait for
                print(f"[tessera] exit: ranks did not all reach the final barrier ({e}); tearing down anyway",
                      file=sys.stderr)
        dist.destroy_process_group()


def deepspeed_config(config: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: the user's file or the shipped ZeRO-``zero_stage`` one, with
    batch sizes, clipping and precision filled in from ``config``. A file that sets any
    of those to another value is refused (one source of truth)."""
    if config.deepspeed_config is not None:
        ds = load_json(config.deepspeed_config)
        source = config.deepspeed_config
    else:
        name = f"zero{config.zero_stage}.json"
        ds = load_json(resources.files("tessera.llm.configs") / name)
        source = f"llm/configs/{name}"
    global_batch = config.micro_batch * config.grad_accum * world_size
    ours: dict[str, Any] = {"train_micro_batch_size_per_gpu": config.micro_batch,
                            "gradient_accumulation_steps": config.grad_accum,
                            "train_batch_size": global_batch, "gradient_clipping": config.clip}
    for key, value in ours.items():
        if key in ds and ds[key] not in (value, "auto"):
            raise ValueError(f"{source} sets {key}={ds[key]} but the training config gives {value}; remove "
                             f"it from the DeepSpeed config (Tessera fills it in) or change the training config")
        ds[key] = value
    bf16 = config.precision == "bf16"
    for key in ("bf16", "fp16"):
        enabled = ds.get(key, {}).get("enabled", False)
        if enabled not in (False, "auto") and (key == "fp16" or not bf16):
            raise ValueError(f"{source} enables {key} but precision={config.precision!r}; set precision in the "
                             f"training config and leave {key} out of the DeepSpeed config")
    ds["bf16"] = {"enabled": bf16}
    ds.pop("fp16", None)
    ds["zero_allow_untested_optimizer"] = True
    if "optimizer" in ds:  # DeepSpeed builds it (e.g. DeepSpeedCPUAdam under offload): our hyper-parameters
        ds["optimizer"].setdefault("params", {}).update(
            lr=config.lr, betas=list(config.betas), weight_decay=config.weight_decay)
    return ds


def _check_batch(config: TrainConfig, world_size: int) -> None:
    if config.global_batch is not None:
        got = config.micro_batch * config.grad_accum * world_size
        if got != config.global_batch:
            raise ValueError(
                f"global_batch={config.global_batch} but micro_batch x grad_accum x world_size = "
                f"{config.micro_batch} x {config.grad_accum} x {world_size} = {got}; change grad_accum to "
                f"{config.global_batch / (config.micro_batch * world_size):g} (it must be a whole number) "
                f"or the micro batch / number of processes")


def _weights_only_checkpoint_engine(ds_config: Any) -> Any:
    """A TorchCheckpointEngine that loads with ``weights_only=True``."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                try:
                    return torch.load(path, map_location=map_location, weights_only=True)
                except Exception as e:
                    raise CheckpointError(f"{path}: cannot be read with weights_only=True ({e}); Tessera "
                                          f"does not unpickle checkpoints. Was it written by another tool?") from e

    return WeightsOnlyCheckpointEngine(ds_config)


# ---- loss and schedule ----


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` at ``max_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def _tag_weights(config: TrainConfig, modalities: list[str] | None) -> Tensor:
    """Weight per modality tag (0 = text, k = k-th manifest modality)."""
    names = ["text", *(modalities or [])]
    unknown = sorted(set(config.loss_weights) - set(names))
    if unknown:
        hint = ("the shards carry no modality tags; write them with write_token_shards(..., manifest=...)"
                if modalities is None else f"known: {names}")
        raise ValueError(f"loss_weights names {unknown} that the data does not have; {hint}")
    return torch.tensor([float(config.loss_weights.get(n, 1.0)) for n in names])


def target_weight(batch: PackedBatch, tag_weight: Tensor) -> Tensor:
    """(B*T,) weight of each target: loss mask x per-token weight x its modality's weight."""
    return batch.loss_weight.reshape(-1) * tag_weight.to(batch.loss_weight.device)[batch.modality.reshape(-1)]


def token_losses(logits: Tensor, batch: PackedBatch) -> Tensor:
    """(B*T,) cross-entropy of every target, in fp32."""
    V = logits.shape[-1]
    return F.cross_entropy(logits.float().reshape(-1, V), batch.targets.reshape(-1), reduction="none")


# ---- the loop ----


def _all_sum(x: Tensor) -> Tensor:
    import torch.distributed as dist

    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Tessera bundle folder (manifest.json and llm/), not a bare model folder."""
    folder = Path(path)
    return (folder / "manifest.json").is_file() and (folder / "llm").is_dir()


def _build_model(config: TrainConfig, reader: TokenShardReader) -> tuple[TesseraLM, str]:
    if config.init_from is not None and is_bundle(config.init_from):
        from ..pipelines.bundle import read_vocab

        manifest = read_vocab(config.init_from).manifest()
        if manifest["hash"] != reader.manifest_hash:
            raise ValueError(
                f"{describe_sources(config.data)} was tokenized with manifest {reader.manifest_hash}, but the "
                f"bundle {config.init_from} has manifest {manifest['hash']}; its token ids would mean other "
                f"things to this LLM. Re-tokenize with that bundle: "
                f"`tessera tokenize DATA --bundle {config.init_from} --out NEW_SHARDS`")
        return TesseraLM.from_pretrained(Path(config.init_from) / "llm", expected_manifest=manifest), manifest["hash"]
    if config.init_from is not None:
        model = TesseraLM.from_pretrained(config.init_from, expected_manifest_hash=reader.manifest_hash)
        return model, reader.manifest_hash
    vocab = config.vocab_size or reader.index.get("vocab_size")
    if vocab is None:
        raise ValueError(f"{describe_sources(config.data)}: the shards do not record a vocabulary size (written "
                         f"without a manifest); set TrainConfig.vocab_size to the vocabulary's size")
    llm = LLMConfig.from_dict(config.model_config) if config.model_config else LLMConfig.preset(config.model, vocab)
    return TesseraLM(llm), reader.manifest_hash


def _bundle_out(config: TrainConfig) -> Path | None:
    """Where the fine-tuned bundle goes (None when not starting from a bundle); checked before training."""
    if config.init_from is None or not is_bundle(config.init_from):
        if config.out_bundle is not None:
            raise ValueError(f"out_bundle={config.out_bundle!r} needs init_from to be a bundle folder (manifest.json "
                             f"and llm/), but init_from={config.init_from!r}; start from a bundle or drop out_bundle")
        return None
    dest = Path(config.out_bundle) if config.out_bundle is not None else Path(config.out_dir) / "bundle"
    if dest.resolve() == Path(config.init_from).resolve():
        raise ValueError(f"out_bundle={str(dest)!r} is the bundle being fine-tuned; write the new bundle to "
                         f"another folder so the original stays intact")
    return dest


def _write_bundle(source: Path, dest: Path, model: TesseraLM, manifest_hash: str) -> None:
    """A copy of the bundle ``source`` (text model, tokenizers, settings) with ``model`` as its
    LLM, stored in the source LLM's dtype (bf16 stays bf16, so a fine-tuned default bundle
    keeps its size; anything else fp32); the manifest goes last, so a half-written bundle
    does not load."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name in ("llm", "manifest.json"):
            continue
        if item.is_dir():
            shutil.copytree(item, dest / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dest / item.name)
    from safetensors import safe_open

    with safe_open(str(source / "llm" / "model.safetensors"), framework="pt") as f:
        bf16 = all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    model.save_pretrained(dest / "llm", manifest_hash=manifest_hash, manifest=load_json(source / "manifest.json"),
                          dtype=torch.bfloat16 if bf16 else None)
    shutil.copy2(source / "manifest.json", dest / "manifest.json")


def _evaluate(engine: Any, config: TrainConfig, manifest_hash: str, seq_len: int) -> float:
    """Mean cross-entropy over the target tokens of the first ``eval_batches`` batches."""
    reader = TokenShardReader(config.eval_data, seq_len=seq_len, expected_manifest_hash=manifest_hash,
                              shuffle=False, loop=False)
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for i, batch in enumerate(reader.batches(config.micro_batch)):
            if i == config.eval_batches:
                break
            b = batch.to(engine.device)
            ce = token_losses(engine(b.ids, positions=b.positions, segment_ids=b.segment_ids), b)
            mask = b.loss_weight.reshape(-1) > 0
            total += torch.stack([ce[mask].sum().double().cpu(), mask.sum().double().cpu()])
    engine.train()
    return float(total[0] / total[1].clamp(min=1))


def _save_checkpoint(engine: Any, ckpt_dir: Path, step: int, state: dict[str, Any], keep: int, rank: int) -> None:
    import torch.distributed as dist

    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    dist.barrier()
    if rank == 0:
        save_json(ckpt_dir / tag / _STATE, state)
        atomic_write_bytes(ckpt_dir / "latest", tag.encode())
        for old in sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _consolidated_state(engine: Any, zero_stage: int) -> dict[str, Tensor] | None:
    """The full module state dict on rank 0 (None elsewhere); every rank must call it."""
    import torch.distributed as dist

    if zero_stage == 3:  # gathered layer by layer onto rank 0
        state = engine._zero3_consolidated_16bit_state_dict()
        return state if dist.get_rank() == 0 else None
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}


def _cpu_bf16_is_native() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 BF16 or AMX); True when it
    cannot tell (no oneDNN), so that nothing is said."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def slow_bf16_note(precision: str, device: str) -> str | None:
    """Why ``precision`` may be a bad choice on ``device``, or None: a CPU without native
    bf16 (AVX-512 BF16 or AMX) emulates every bf16 op."""
    if precision != "bf16" or device != "cpu" or _cpu_bf16_is_native():
        return None
    return (f"precision=bf16 on a CPU without native bf16 (torch sees {torch.backends.cpu.get_cpu_capability()}, "
            f"no AVX-512 BF16 or AMX): bf16 is emulated and a step can be many times slower than in fp32 (seen: "
            f"the 18-layer default LLM took 160-230 s a step in bf16 with --compile against 8 s in fp32 on such a "
            f"2-core machine); pass --precision fp32 here, or train where bf16 is native")


def train(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) as ``config`` says; returns a summary: steps, final/eval loss
    (``eval_loss`` None without ``eval_data``), tokens seen, paths of the model folder and
    metrics log, the step resumed from."""
    import deepspeed
    import torch.distributed as dist
    from tqdm import tqdm

    rank, world = init_distributed()
    _check_batch(config, world)
    from deepspeed.accelerator import get_accelerator

    note = slow_bf16_note(config.precision, get_accelerator().device_name())
    if note and rank == 0:
        warnings.warn(note, stacklevel=2)
    out = Path(config.out_dir)
    ckpt_dir = out / _CKPT
    bundle_dir = _bundle_out(config)
    seed_everything(config.seed)

    # 1. data and model
    reader = TokenShardReader(config.data, seq_len=config.seq_len or 1, seed=config.seed)  # peek at the index
    model, manifest_hash = _build_model(config, reader)
    seq_len = config.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}; "
                         f"lower seq_len or use a model with longer context")
    if reader.index.get("max_id", -1) >= model.config.vocab_size:
        raise ValueError(f"{describe_sources(config.data)} holds id {reader.index['max_id']} but the model's "
                         f"vocabulary has {model.config.vocab_size} ids; resize the model (resize_vocab) or re-tokenize")
    reader = TokenShardReader(config.data, seq_len=seq_len, expected_manifest_hash=manifest_hash,
                              seed=config.seed, shuffle_buffer=config.shuffle_buffer)
    tag_weight = _tag_weights(config, reader.modalities)
    if config.lora is not None:
        apply_lora(model, config.lora)

    # 2. DeepSpeed engine
    ds_config = deepspeed_config(config, world)
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for n, p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if "optimizer" in ds_config:
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    else:  # a plain torch AdamW: nothing to compile
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if config.compile:  # in place, so checkpoints and the consolidated model keep their parameter names
        engine.module.compile()
    if type(engine.checkpoint_engine).__name__ == "TorchCheckpointEngine":  # not a user-chosen writer
        engine.checkpoint_engine = _weights_only_checkpoint_engine(engine._config)

    # 3. resume
    step, tokens, resumed_from = 0, 0, None
    if config.resume and (ckpt_dir / "latest").is_file():
        tag = (ckpt_dir / "latest").read_text().strip()
        state = load_json(ckpt_dir / tag / _STATE)
        engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
        reader.load_state_dict(state["reader"])
        step, tokens, resumed_from = int(state["step"]), int(state["tokens"]), int(state["step"])
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_json(out / "train_config.json", config.to_dict())
        if metrics_path.exists():  # drop what a killed run logged after its last checkpoint
            keep = [r for r in MetricsLog.read(metrics_path) if resumed_from is not None and r["step"] <= resumed_from]
            atomic_write_bytes(metrics_path, "".join(json.dumps(r) + "\n" for r in keep).encode())
    log = MetricsLog(metrics_path) if rank == 0 else None

    # 4. train
    engine.train()
    batches = step_batches(reader, micro_batch=config.micro_batch, grad_accum=config.grad_accum, rank=rank,
                           world_size=world, num_workers=config.num_workers)
    bar = tqdm(total=config.max_steps, initial=step, disable=rank != 0 or not config.progress, desc="train")
    loss_value = float("nan")
    eval_loss: float | None = None  # None (JSON null) when there is no eval data
    reader_state = reader.state_dict()
    t_last = time.perf_counter()
    while step < config.max_steps:
        micro, reader_state = next(batches)
        micro = [b.to(engine.device) for b in micro]
        weights = [target_weight(b, tag_weight) for b in micro]
        # the step's total target weight over all ranks normalises every micro-batch loss
        denom = float(_all_sum(torch.stack([w.sum() for w in weights]).sum().double().reshape(1)).item())
        lr = lr_at(step, config)
        for g in optimizer.param_groups:
            g["lr"] = lr
        n_tags = len(tag_weight)
        sums = torch.zeros(1 + 2 * n_tags, dtype=torch.float64, device=engine.device)  # loss, per-tag ce, count
        for b, w in zip(micro, weights, strict=True):
            ce = token_losses(engine(b.ids, positions=b.positions, segment_ids=b.segment_ids), b)
            weighted = (ce * w).sum()
            engine.backward(weighted * (world * config.grad_accum / max(denom, 1e-12)))
            engine.step()
            used = (b.loss_weight.reshape(-1) > 0).double()
            tags = b.modality.reshape(-1)
            sums[0] += weighted.detach().double()
            sums[1 : 1 + n_tags].index_add_(0, tags, ce.detach().double() * used)
            sums[1 + n_tags :].index_add_(0, tags, used)
        sums = _all_sum(sums).cpu()
        step += 1
        n_tok = int(sums[1 + n_tags :].sum())
        tokens += n_tok
        loss_value = float(sums[0]) / max(denom, 1e-12)
        bar.update(1)
        if config.eval_data is not None and config.eval_every and step % config.eval_every == 0:
            eval_loss = _evaluate(engine, config, manifest_hash, seq_len)
        if log is not None and (step % config.log_every == 0 or step == config.max_steps):
            now = time.perf_counter()
            per_tag = {f"loss_{name}": float(sums[1 + k] / sums[1 + n_tags + k])
                       for k, name in enumerate(["text", *(reader.modalities or [])]) if sums[1 + n_tags + k] > 0}
            row: dict[str, Any] = {"loss": loss_value, "lr": lr, "tokens": tokens, "target_tokens": n_tok,
                                   "step_s": round(now - t_last, 4), **per_tag}
            grad_norm = engine.get_global_grad_norm()  # DeepSpeed reports it under ZeRO and bf16
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            if config.eval_data is not None and config.eval_every and step % config.eval_every == 0:
                row["eval_loss"] = eval_loss
            log.log(step, **row)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        t_last = time.perf_counter()
        if config.save_every and step % config.save_every == 0 and step < config.max_steps:
            _save_checkpoint(engine, ckpt_dir, step, {"step": step, "tokens": tokens, "reader": reader_state,
                                                      "manifest_hash": manifest_hash, "world_size": world},
                             config.keep_checkpoints, rank)
    bar.close()
    if config.eval_data is not None and not (config.eval_every and step % config.eval_every == 0):
        eval_loss = _evaluate(engine, config, manifest_hash, seq_len)
    _save_checkpoint(engine, ckpt_dir, step, {"step": step, "tokens": tokens, "reader": reader_state,
                                              "manifest_hash": manifest_hash, "world_size": world},
                     config.keep_checkpoints, rank)

    # 5. consolidated model (LoRA merged) + adapters
    state = _consolidated_state(engine, zero_stage)
    model_dir = out / "model"
    if rank == 0 and state is not None:
        final = TesseraLM(model.config)
        if config.lora is not None:
            apply_lora(final, config.lora)
            save_adapter({k: v.float() for k, v in state.items()}, config.lora, out / "adapter",
                         manifest_hash=manifest_hash)
        final.load_state_dict({k: v.float() for k, v in state.items()})
        if config.lora is not None:
            merge_lora(final)
        final.save_pretrained(model_dir, manifest_hash=manifest_hash)
        if bundle_dir is not None:
            _write_bundle(Path(config.init_from), bundle_dir, final, manifest_hash)
        log.log(step, event="done", final_loss=loss_value, eval_loss=eval_loss)
        log.close()
    dist.barrier()
    return {"steps": step, "final_loss": loss_value, "eval_loss": eval_loss, "tokens": tokens,
            "model_dir": str(model_dir), "bundle_dir": str(bundle_dir) if bundle_dir is not None else None,
            "metrics": str(metrics_path), "resumed_from": resumed_from,
            "world_size": world, "zero_stage": zero_stage}


# ---- command line ----


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera train", description="Train or fine-tune the Tessera LLM "
                                "through DeepSpeed. Values given here override the --config file.")
    p.add_argument("--config", help="TrainConfig JSON file")
    p.add_argument("--data", nargs="+", action="extend", help="token-shard folder(s); several are read as one corpus "
                   "(they must share the manifest)")
    p.add_argument("--out", dest="out_dir", help="output folder (checkpoints, metrics, model)")
    p.add_argument("--init-from", dest="init_from", help="bundle folder or saved model folder to fine-tune")
    p.add_argument("--out-bundle", dest="out_bundle",
                   help="with a bundle in --init-from: the new bundle's folder (default: OUT/bundle)")
    p.add_argument("--model", help="LLM preset (debug, cpu-small, 150m, 400m, 1b)")
    p.add_argument("--eval-data", dest="eval_data", help="held-out token-shard folder: eval loss every --eval-every "
                   "steps and at the end")
    p.add_argument("--seq-len", dest="seq_len", type=int, help="tokens per packed training row (default: the "
                   "model's max_seq_len)")
    p.add_argument("--micro-batch", dest="micro_batch", type=int, help="rows per process per forward pass (4)")
    p.add_argument("--grad-accum", dest="grad_accum", type=int, help="micro-batches per optimizer step (1)")
    p.add_argument("--global-batch", dest="global_batch", type=int, help="rows per optimizer step; must equal "
                   "micro-batch x grad-accum x world size (checked up front)")
    p.add_argument("--lr", type=float, help="peak learning rate after warmup (3e-4)")
    p.add_argument("--min-lr", dest="min_lr", type=float, help="where the cosine schedule ends (3e-5)")
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int, help="linear warmup steps (100)")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="optimizer steps in all; a resumed run "
                   "continues to this count (1000)")
    p.add_argument("--precision", choices=_PRECISIONS, help="fp32 (default) or bf16 autocast")
    p.add_argument("--zero-stage", dest="zero_stage", type=int, choices=(0, 1, 2, 3),
                   help="DeepSpeed ZeRO stage: picks llm/configs/zero{N}.json (0)")
    p.add_argument("--deepspeed-config", dest="deepspeed_config", help="your own DeepSpeed JSON config "
                   "(e.g. llm/configs/zero3_offload.json)")
    p.add_argument("--eval-every", dest="eval_every", type=int, help="steps between evals (0: only at the end)")
    p.add_argument("--save-every", dest="save_every", type=int, help="steps between checkpoints; a killed run "
                   "resumes from the last (0: only at the end)")
    p.add_argument("--seed", type=int, help="data order and initialisation seed (0)")
    p.add_argument("--loss-weight", dest="loss_weight", action="extend", nargs="+", metavar="NAME=W",
                   help="weight of 'text' or a modality's target tokens in the loss (default 1; one or more, "
                   "repeatable), e.g. --loss-weight text=2 speech=0.5")
    p.add_argument("--lora-r", dest="lora_r", type=int, help="enable LoRA with this rank")
    p.add_argument("--compile", action="store_const", const=True,
                   help="torch.compile the model (the first steps compile, tens of seconds; then ~1.1x faster "
                        "on the CPU at cpu-small; needs a C++ compiler)")
    p.add_argument("--no-resume", dest="resume", action="store_const", const=False)
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p


def _loss_weights(items: Sequence[str]) -> dict[str, float]:
    """``["text=2", "speech=0.5"]`` → ``{"text": 2.0, "speech": 0.5}``; a malformed item exits with a message."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not name.strip() or not (math.isfinite(weight) and weight >= 0):
            raise SystemExit(f"tessera train: --loss-weight {item!r} is not NAME=W with W >= 0; give e.g. "
                             f"--loss-weight text=2 (NAME is 'text' or a modality of the shards' manifest)")
        out[name.strip()] = weight
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = vars(_parser().parse_args(argv))
    args.pop("local_rank")
    base = load_json(args.pop("config")) if args.get("config") else {}
    lora_r = args.pop("lora_r")
    weights = _loss_weights(args.pop("loss_weight") or [])
    if args.get("data") is not None and len(args["data"]) == 1:
        args["data"] = args["data"][0]
    base.update({k: v for k, v in args.items() if v is not None})
    if weights:
        base["loss_weights"] = {**(base.get("loss_weights") or {}), **weights}
    if lora_r is not None:
        base["lora"] = {**(base.get("lora") or {}), "r": lora_r}
    for key in ("data", "out_dir"):
        if key not in base:
            raise SystemExit(f"tessera train: --{key.replace('_dir', '')} is required (or give it in --config)")
    result = train(TrainConfig.from_dict(base))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
