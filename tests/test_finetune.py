"""The fine-tuning user path of docs/finetune.md, end to end through the `tessera` CLI:
captioned PNGs → chat JSONL → `tessera tokenize --bundle` → `tessera train --init-from BUNDLE`
(full and LoRA under ZeRO-2) → the fine-tuned bundle loads and `tessera generate` writes a
decodable image; shards tokenized with another bundle are refused, naming both hashes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tessera.apps.cli import main as cli
from tessera.core.checkpoint import load_tensors
from tessera.core.training import MetricsLog
from tessera.llm.train import TrainConfig, _bundle_out
from tessera.modalities.image import ImageTokenizer
from tessera.modalities.image.io import save_image
from tessera.modalities.world.visual import render_image, sample_image_scene
from tessera.pipelines.bundle import load_bundle, read_vocab, tiny_bundle

N_IMAGES = 8
TRAIN = ["--seq-len", "256", "--micro-batch", "2", "--max-steps", "10", "--warmup-steps", "1", "--lr", "3e-3",
         "--no-progress"]


def _write_captioned_images(folder: Path, size: tuple[int, int]) -> Path:
    """The worked example's data, as the docs make it: PNGs of the built-in world and a JSONL of chat documents."""
    folder.mkdir(parents=True)
    with (folder / "captions.jsonl").open("w") as f:
        for i in range(N_IMAGES):
            scene = sample_image_scene(i)
            save_image(render_image(scene, size=size), str(folder / f"{i:04d}.png"))
            f.write(json.dumps({"messages": [
                {"role": "user", "content": scene.caption},
                {"role": "assistant", "content": [{"type": "image", "path": f"{i:04d}.png"}]}]}) + "\n")
    return folder / "captions.jsonl"


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in MetricsLog.read(run / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("finetune")
    bundle = root / "bundle"
    tiny_bundle(bundle, plugins={"image": ImageTokenizer.debug()})
    jsonl = _write_captioned_images(root / "my_images", size=(64, 64))  # the tokenizer fits them to its 32x32
    shards = root / "shards"
    assert cli(["tokenize", str(jsonl), "--bundle", str(bundle), "--out", str(shards), "--workers", "0",
                "--no-progress"]) == 0
    full, lora = root / "runs" / "ft", root / "runs" / "lora"
    assert cli(["train", "--init-from", str(bundle), "--data", str(shards), "--out", str(full), *TRAIN]) == 0
    assert cli(["train", "--init-from", str(bundle), "--data", str(shards), "--out", str(lora), "--lora-r", "4",
                "--zero-stage", "2", "--out-bundle", str(root / "lora_bundle"), *TRAIN, "--lr", "1e-2"]) == 0
    return {"root": root, "bundle": bundle, "shards": shards, "full": full, "lora": lora,
            "lora_bundle": root / "lora_bundle"}


def test_tokenized_shards_carry_the_bundle_manifest(example: dict[str, Any]) -> None:
    index = json.loads((example["shards"] / "index.json").read_text())
    assert index["docs"] == N_IMAGES
    assert index["manifest_hash"] == read_vocab(example["bundle"]).manifest_hash


@pytest.mark.parametrize(("run", "factor"), [("full", 0.85), ("lora", 0.95)])  # rank-4 adapters learn slower
def test_finetuning_a_bundle_lowers_the_loss(example: dict[str, Any], run: str, factor: float) -> None:
    losses = _losses(example[run])
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < factor * losses[0], losses


def test_finetuned_bundle_loads_and_generates_a_decodable_image(example: dict[str, Any],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    original = load_tensors(example["bundle"] / "llm" / "model.safetensors")
    for run, folder in (("full", example["full"] / "bundle"), ("lora", example["lora_bundle"])):
        bundle = load_bundle(folder)  # every part checked against the manifest
        assert bundle.vocab.manifest_hash == read_vocab(example["bundle"]).manifest_hash
        tuned = load_tensors(folder / "llm" / "model.safetensors")
        plain = load_tensors(example[run] / "model" / "model.safetensors")
        assert tuned.keys() == plain.keys() == original.keys()
        # the bundle holds the run's final LLM, in the starting bundle's dtype
        assert all(torch.equal(tuned[k], plain[k].to(original[k].dtype)) for k in tuned)
        moved = [k for k in tuned if not torch.allclose(tuned[k].float(), original[k].float(), atol=1e-3)]
        assert any(".qkv." in k for k in moved), (run, moved)  # which moved from the original (LoRA: merged)
    png = example["root"] / "star.png"
    caption = sample_image_scene(0).caption
    assert cli(["generate", "text-to-image", caption, "--bundle", str(example["full"] / "bundle"),
                "--out", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    image = ImageTokenizer.debug().read(str(png))
    assert image.shape == (3, 32, 32) and image.std() > 0


def test_shards_from_another_bundle_are_refused_naming_both_hashes(example: dict[str, Any], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    tiny_bundle(other, plugins={})  # text only: another vocabulary
    ours, theirs = read_vocab(example["bundle"]).manifest_hash, read_vocab(other).manifest_hash
    assert ours != theirs
    code = cli(["train", "--init-from", str(other), "--data", str(example["shards"]), "--out", str(tmp_path / "run"),
                *TRAIN])
    err = capsys.readouterr().err
    assert code == 2
    assert ours in err and theirs in err and "tessera tokenize" in err and f"--bundle {other}" in err
    assert not (tmp_path / "run" / "model").exists()
    # several --data sources (repeated flags add up) are one corpus, checked the same way
    copy = tmp_path / "copy.tar"
    copy.write_bytes(next(Path(example["shards"]).glob("*.tar")).read_bytes())
    code = cli(["train", "--init-from", str(other), "--data", str(example["shards"]), "--data", str(copy),
                "--out", str(tmp_path / "run"), *TRAIN])
    err = capsys.readouterr().err
    assert code == 2 and ours in err and f"{example['shards']}, {copy}" in err


def test_out_bundle_rules(example: dict[str, Any], tmp_path: Path) -> None:
    bundle = str(example["bundle"])
    assert _bundle_out(TrainConfig(data="d", out_dir=str(tmp_path), init_from=bundle)) == tmp_path / "bundle"
    assert _bundle_out(TrainConfig(data="d", out_dir=str(tmp_path), init_from=str(example["full"] / "model"))) is None
    with pytest.raises(ValueError, match="needs init_from to be a bundle folder"):
        _bundle_out(TrainConfig(data="d", out_dir=str(tmp_path), out_bundle=str(tmp_path / "b")))
    with pytest.raises(ValueError, match="is the bundle being fine-tuned"):
        _bundle_out(TrainConfig(data="d", out_dir=str(tmp_path), init_from=bundle, out_bundle=bundle))
