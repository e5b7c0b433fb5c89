"""LLM training through DeepSpeed: it learns, resumes after SIGKILL on the same loss curve,
gives the same losses on 2 processes under ZeRO-2/3 as on 1, and fine-tunes with LoRA.

One in-process reference run (gloo, world size 1) is shared; the resume and ZeRO tests
start DeepSpeed in subprocesses, the way the CLI and the launcher do.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tessera.core.checkpoint import CheckpointError, load_tensors
from tessera.core.training import MetricsLog
from tessera.core.vocab import ManifestMismatchError
from tessera.llm.data import TokenShardReader, write_token_shards
from tessera.llm.lora import LoraOptions, apply_lora
from tessera.llm.model import TesseraLM
from tessera.llm.train import (
    TrainConfig,
    _check_batch,
    _free_port,
    _tag_weights,
    _weights_only_checkpoint_engine,
    deepspeed_config,
    lr_at,
    slow_bf16_note,
    target_weight,
    train,
)

V = 64
MANIFEST = {"hash": "test-manifest-1", "size": V, "modalities": [{"name": "image", "start": 48, "stop": V}]}
ROOT = Path(__file__).resolve().parents[1]


def _corpus(n: int, strides: tuple[int, ...], seed: int) -> list[dict[str, np.ndarray]]:
    """Arithmetic progressions mod 63 (ids 1..63): after two tokens the rest is predictable."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        a, d, length = int(rng.integers(0, 63)), int(rng.choice(strides)), int(rng.integers(8, 40))
        docs.append({"ids": np.array([(a + d * i) % 63 + 1 for i in range(length)]), "loss_mask": np.ones(length)})
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_token_shards(_corpus(400, (1, 2, 3), 0), root / "train", MANIFEST["hash"], 100, manifest=MANIFEST)
    write_token_shards(_corpus(40, (1, 2, 3), 1), root / "eval", MANIFEST["hash"], 100, manifest=MANIFEST)
    write_token_shards(_corpus(200, (5, 7), 2), root / "tune", MANIFEST["hash"], 100, manifest=MANIFEST)
    return root


def _config(corpus: Path, out: Path, **overrides: Any) -> TrainConfig:
    base = dict(eval_data=str(corpus / "eval"), max_steps=30, lr=1e-2, min_lr=1e-3, warmup_steps=4,
                eval_every=10)
    return TrainConfig.debug(data=str(corpus / "train"), out_dir=str(out), **{**base, **overrides})


def _losses(metrics: str | Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in MetricsLog.read(metrics) if "loss" in r}


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return train(_config(corpus, tmp_path_factory.mktemp("reference")))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT.parent)}


def _launch(*configs: TrainConfig, world: int = 1) -> list[subprocess.Popen]:
    """Start ``world`` processes the way a launcher does (env rendezvous); each runs
    ``main --config`` for every config in turn (one start-up for several runs)."""
    paths = []
    for config in configs:
        paths.append(Path(config.out_dir + ".json"))
        paths[-1].write_text(json.dumps(config.to_dict()))
    code = "import sys; from tessera.llm.train import main\nfor p in sys.argv[1:]: main(['--config', p])"
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world)}
    return [subprocess.Popen([sys.executable, "-c", code, *map(str, paths)],
                             env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for r in range(world)]


def _wait(procs: list[subprocess.Popen], timeout: float = 300) -> dict[str, Any]:
    """Wait for every process; returns rank 0's result (the JSON line ``main`` prints)."""
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-3000:]
        outs.append(out)
    return json.loads([line for line in outs[0].splitlines() if line.startswith("{")][-1])


# ---- fast checks, no DeepSpeed engine ----


def test_schedule_batch_arithmetic_and_config_errors(tmp_path: Path) -> None:
    c = TrainConfig(data="d", out_dir="o", lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, c) == pytest.approx(1e-4) and lr_at(9, c) == pytest.approx(1e-3)
    assert lr_at(60, c) == pytest.approx(5.5e-4) and lr_at(110, c) == pytest.approx(1e-4)
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match=r"micro_batch x grad_accum x world_size = 4 x 3 x 2 = 24"):
        _check_batch(TrainConfig(data="d", out_dir="o", micro_batch=4, grad_accum=3, global_batch=16), 2)
    ds = deepspeed_config(TrainConfig(data="d", out_dir="o", zero_stage=3, micro_batch=2, grad_accum=2), 2)
    assert ds["train_batch_size"] == 8 and ds["zero_optimization"]["stage"] == 3
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=8 but the training config gives 4"):
        deepspeed_config(TrainConfig(data="d", out_dir="o", deepspeed_config=str(user)), 1)
    with pytest.raises(ValueError, match="precision='fp16'"):
        TrainConfig(data="d", out_dir="o", precision="fp16")
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"data": "d", "out_dir": "o", "micro_batchsize": 3})


def test_per_modality_weights_and_unknown_names(corpus: Path) -> None:
    reader = TokenShardReader(corpus / "train", seq_len=32)
    batch = next(reader.batches(2))
    w = _tag_weights(TrainConfig(data="d", out_dir="o", loss_weights={"image": 0.25}), reader.modalities)
    tw = target_weight(batch, w).reshape(batch.targets.shape)
    image = batch.targets >= 48
    assert image.any() and (~image).any()
    assert torch.equal(tw[image], 0.25 * batch.loss_weight[image])
    assert torch.equal(tw[~image], batch.loss_weight[~image])
    with pytest.raises(ValueError, match=r"loss_weights names \['speech'\].*known: \['text', 'image'\]"):
        _tag_weights(TrainConfig(data="d", out_dir="o", loss_weights={"speech": 2.0}), reader.modalities)


def test_checkpoint_loads_refuse_pickled_objects(tmp_path: Path) -> None:
    engine = _weights_only_checkpoint_engine(None)
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(engine.load(str(tmp_path / "ok.pt"))["w"], torch.ones(2))
    torch.save({"obj": Path("x")}, tmp_path / "bad.pt")  # any class outside the allowlist
    with pytest.raises(CheckpointError, match="weights_only=True"):
        engine.load(str(tmp_path / "bad.pt"))


# ---- DeepSpeed runs ----


def test_training_learns_and_saves_a_loadable_model(reference: dict[str, Any]) -> None:
    losses = _losses(reference["metrics"])
    assert sorted(losses) == list(range(1, 31))
    assert abs(losses[1] - math.log(V)) < 0.3  # starts at chance
    assert reference["eval_loss"] < 1.2, reference  # chance is ln(64) = 4.16
    rows = MetricsLog.read(reference["metrics"])
    assert [r["step"] for r in rows if "eval_loss" in r and "loss" in r] == [10, 20, 30]
    model = TesseraLM.from_pretrained(reference["model_dir"], expected_manifest_hash=MANIFEST["hash"])
    assert model.config.vocab_size == V
    with pytest.raises(ManifestMismatchError, match="test-manifest-1"):
        TesseraLM.from_pretrained(reference["model_dir"], expected_manifest_hash="another-manifest")


@pytest.mark.slow
def test_resume_after_sigkill_continues_the_loss_curve(corpus: Path, reference: dict[str, Any],
                                                         tmp_path: Path) -> None:
    config = _config(corpus, tmp_path / "run", save_every=10)
    (proc,) = _launch(config)
    latest = tmp_path / "run" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{out[-3000:]}"
    killed_at = max(_losses(tmp_path / "run" / "metrics.jsonl"), default=0)
    assert killed_at < config.max_steps
    result = _wait(_launch(config))
    assert 0 <= killed_at - result["resumed_from"] <= config.save_every  # lost at most one checkpoint interval
    rows = [r for r in MetricsLog.read(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 31))  # the killed run's unsaved steps are dropped
    resumed = [r for r in MetricsLog.read(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "done"]
    assert resumed, "the resumed run did not finish"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000030"
    ref = _losses(reference["metrics"])
    got = {r["step"]: r["loss"] for r in rows}
    np.testing.assert_allclose([got[s] for s in range(1, 31)], [ref[s] for s in range(1, 31)], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_two_processes_under_zero2_and_zero3_match_one_process(corpus: Path, reference: dict[str, Any],
                                                               tmp_path: Path) -> None:
    configs = [_config(corpus, tmp_path / f"zero{stage}", zero_stage=stage, micro_batch=2, global_batch=4,
                       eval_data=None, eval_every=0) for stage in (2, 3)]
    _wait(_launch(*configs, world=2))
    ref = _losses(reference["metrics"])
    for stage in (2, 3):
        got = _losses(tmp_path / f"zero{stage}" / "metrics.jsonl")
        np.testing.assert_allclose([got[s] for s in range(1, 31)], [ref[s] for s in range(1, 31)], rtol=0,
                                   atol=1e-5, err_msg=f"ZeRO-{stage}")
        # the consolidated model of 2 ZeRO ranks is a complete TesseraLM
        model = TesseraLM.from_pretrained(tmp_path / f"zero{stage}" / "model",
                                          expected_manifest_hash=MANIFEST["hash"])
        assert model.num_params() == TesseraLM.from_pretrained(reference["model_dir"]).num_params()


def test_lora_finetune_changes_only_adapters_and_merges_exactly(corpus: Path, reference: dict[str, Any],
                                                               tmp_path: Path) -> None:
    config = TrainConfig.debug(data=str(corpus / "tune"), out_dir=str(tmp_path / "lora"),
                               init_from=reference["model_dir"], lora=LoraOptions.debug(), zero_stage=2,
                               max_steps=12, lr=1e-2, warmup_steps=2, min_lr=1e-3)
    result = train(config)
    losses = _losses(result["metrics"])
    assert losses[12] < losses[1] - 0.3, losses  # the adapters learned the new strides
    base = TesseraLM.from_pretrained(reference["model_dir"])
    merged = TesseraLM.from_pretrained(result["model_dir"], expected_manifest_hash=MANIFEST["hash"])
    adapter = load_tensors(tmp_path / "lora" / "adapter" / "adapter.safetensors")
    assert adapter and all(".lora_" in k for k in adapter)
    targets = ("qkv.weight", "proj.weight", "gate_up.weight", "down.weight")
    for name, w in merged.state_dict().items():
        if name.endswith(targets):
            assert not torch.equal(w, base.state_dict()[name]), name
        else:  # embeddings, norms, head: frozen, bit-identical
            assert torch.equal(w, base.state_dict()[name]), name
    adapted = apply_lora(TesseraLM.from_pretrained(reference["model_dir"]), config.lora)
    missing = adapted.load_state_dict(adapter, strict=False)
    assert not missing.unexpected_keys
    ids = torch.randint(1, V, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted(ids), atol=2e-5, rtol=1e-5)
        assert (merged(ids) - base(ids)).abs().max() > 1e-3


def test_bf16_under_zero1_trains_and_reports_grad_norm(corpus: Path, tmp_path: Path, monkeypatch: Any) -> None:
    # as on a CPU that emulates bf16: train() itself must say so, and still train
    from tessera.llm import train as train_mod

    monkeypatch.setattr(train_mod, "_cpu_bf16_is_native", lambda: False)
    with pytest.warns(UserWarning, match="pass --precision fp32"):
        result = train(_config(corpus, tmp_path / "bf16", precision="bf16", zero_stage=1, max_steps=8,
                               eval_data=None, eval_every=0))
    rows = [r for r in MetricsLog.read(result["metrics"]) if "loss" in r]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, rows
    # no eval data: no eval loss, written as JSON null (not NaN, which strict JSON readers refuse)
    assert result["eval_loss"] is None and MetricsLog.read(result["metrics"])[-1]["eval_loss"] is None
    json.loads(json.dumps(result, allow_nan=False))
    model = TesseraLM.from_pretrained(result["model_dir"], expected_manifest_hash=MANIFEST["hash"])
    assert torch.isfinite(model(torch.randint(1, V, (1, 16)))).all()


def test_command_line_loss_weights_merge_over_the_config_file(tmp_path: Path, monkeypatch: Any) -> None:
    from tessera.llm import train as train_mod

    seen: list[Any] = []
    monkeypatch.setattr(train_mod, "train", lambda config: seen.append(config) or {"steps": 0})
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"data": "d", "out_dir": "o", "loss_weights": {"text": 3.0, "image": 0.5}}))
    train_mod.main(["--config", str(config), "--loss-weight", "text=2", "--loss-weight", "speech=0"])
    assert seen[0].loss_weights == {"text": 2.0, "image": 0.5, "speech": 0.0}
    train_mod.main(["--config", str(config), "--loss-weight", "text=2", "speech=0", "--loss-weight", "video=4"])
    assert seen[1].loss_weights == {"text": 2.0, "image": 0.5, "speech": 0.0, "video": 4.0}  # one flag, several
    for bad in ("text", "=2", "text=-1", "text=nan", "text=inf", "text=two"):
        with pytest.raises(SystemExit, match="NAME=W"):
            train_mod.main(["--data", "d", "--out", "o", "--loss-weight", bad])


@pytest.mark.slow
def test_compiled_training_follows_the_eager_loss_curve(corpus: Path, reference: dict[str, Any],
                                                        tmp_path: Path) -> None:
    """--compile (Module.compile in place) trains the same model: the loss curve of the
    eager reference within float tolerance, and a consolidated model with the same names."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    result = train(_config(corpus, tmp_path / "compiled", compile=True))
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo really compiled the model
    ours, ref = _losses(result["metrics"]), _losses(reference["metrics"])
    assert sorted(ours) == sorted(ref)
    assert all(abs(ours[s] - ref[s]) < 0.05 for s in ref), (ours, ref)
    assert abs(result["eval_loss"] - reference["eval_loss"]) < 0.05
    model = TesseraLM.from_pretrained(result["model_dir"], expected_manifest_hash=MANIFEST["hash"])
    eager = TesseraLM.from_pretrained(reference["model_dir"], expected_manifest_hash=MANIFEST["hash"])
    assert model.state_dict().keys() == eager.state_dict().keys()


_EXIT_SCRIPT = """
import os, sys, time
import torch.distributed as dist
from tessera.llm.train import _destroy_process_group
rank, leave = int(sys.argv[1]), sys.argv[3] == "leave"
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
if leave and rank == 1:
    os._exit(0)  # a peer that dies without reaching the final barrier
start = time.monotonic()
_destroy_process_group(timeout_s=5)
assert not dist.is_initialized()
print(f"rank {rank} torn down in {time.monotonic() - start:.1f} s")
"""


@pytest.mark.parametrize("mode", ["stay", "leave"])
def test_distributed_exit_meets_at_a_barrier_and_survives_a_dead_peer(tmp_path: Path, mode: str) -> None:
    """Both ranks reach the exit barrier and tear down cleanly; when one died first, the other
    gives up on the barrier after its timeout and still exits 0 (no hang, no abort)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _EXIT_SCRIPT, str(rank), str(tmp_path / "init"), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "rank 0 torn down" in outs[0][0], outs
    gave_up = "did not all reach the final barrier" in outs[0][1]
    assert gave_up == (mode == "leave"), outs
    if mode == "stay":
        assert "rank 1 torn down" in outs[1][0], outs


def test_bf16_on_a_cpu_without_native_bf16_gets_a_note_that_says_use_fp32(monkeypatch: Any) -> None:
    from tessera.llm import train as train_mod

    monkeypatch.setattr(train_mod, "_cpu_bf16_is_native", lambda: False)
    note = slow_bf16_note("bf16", "cpu")
    assert note is not None and "--precision fp32" in note and "precision=bf16" in note
    assert slow_bf16_note("fp32", "cpu") is None and slow_bf16_note("bf16", "cuda") is None
    monkeypatch.setattr(train_mod, "_cpu_bf16_is_native", lambda: True)
    assert slow_bf16_note("bf16", "cpu") is None
