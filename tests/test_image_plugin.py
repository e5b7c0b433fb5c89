"""The image tokenizer plugin: contract, token layout, file I/O and every bad-input path,
metrics, and a short training run that must learn."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from tessera.core.registry import get_modality
from tessera.core.spec import LayoutError
from tessera.core.training import MetricsLog
from tessera.modalities.image import ImageTokenizer
from tessera.modalities.image.io import ImageFileError, fit_image, load_image
from tessera.modalities.image.model import ImageAutoencoder, ImageTokenizerConfig
from tessera.modalities.image.train import TrainConfig, psnr, ssim, train


@pytest.fixture(scope="module")
def tok() -> ImageTokenizer:
    return ImageTokenizer.debug()


def test_registered_and_spec(tok: ImageTokenizer) -> None:
    assert get_modality("image") is ImageTokenizer
    spec = tok.spec
    assert spec.name == "image" and spec.media_kind == "image" and spec.layout.kind == "grid"
    assert [m.name for m in spec.layout.meta] == ["height", "width"]
    assert spec.codebook_size == 2 * tok.config.max_grid + tok.model.quantizer.codebook_size
    assert spec.fingerprint == ImageTokenizer.debug().spec.fingerprint  # seeded weights
    assert ImageTokenizerConfig.builtin().grid == (16, 16)  # 256 code tokens for the built-in world


def test_encode_decode_shapes_dtype_and_determinism(tok: ImageTokenizer) -> None:
    img = tok.example(3)
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and torch.equal(img, tok.example(3))
    ids = tok.encode(img)
    assert ids.dtype == torch.long and ids.shape == (2 + 8 * 8,)
    assert torch.equal(ids, tok.encode(img.clone()))
    assert 0 <= int(ids.min()) and int(ids.max()) < tok.spec.codebook_size
    out = tok.decode(ids)
    assert out.shape == img.shape and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    batch = torch.stack([img, tok.example(4)])
    assert torch.equal(tok.encode_batch(batch)[0], ids)
    assert torch.allclose(tok.decode_batch(tok.encode_batch(batch))[0], out, atol=1e-6)


def test_non_square_round_trip_uses_meta_tokens(tok: ImageTokenizer) -> None:
    img = torch.rand(3, 24, 40)
    ids = tok.encode(img)
    meta, codes = tok.spec.layout.unflatten(ids)
    assert meta == {"height": 6, "width": 10} and codes.shape == (60, 1)
    assert tok.decode(ids).shape == (3, 24, 40)


def test_bad_media_and_ids_raise(tok: ImageTokenizer) -> None:
    with pytest.raises(ValueError, match=r"divisible by 4"):
        tok.encode(torch.rand(3, 30, 32))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        tok.encode(torch.rand(32, 32, 3))
    with pytest.raises(ValueError, match="NaN"):
        tok.encode(torch.full((3, 32, 32), float("nan")))
    with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
        tok.encode(torch.rand(3, 32, 32) * 255)
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="largest is 64x64"):
        tok.encode(torch.rand(3, 4 * 65, 8))
    ids = tok.encode(tok.example(0))
    bad = ids.clone()
    bad[5] = tok.spec.codebook_size  # past the end of the code range
    with pytest.raises(LayoutError, match="step 3 level 0"):
        tok.decode(bad)
    with pytest.raises(LayoutError, match="layout needs 64"):
        tok.decode(ids[:-1])
    with pytest.raises(LayoutError, match="meta"):
        tok.decode(ids[2:])
    with pytest.raises(LayoutError, match="integer ids"):
        tok.decode(ids.float())


def test_save_load_round_trip(tok: ImageTokenizer, tmp_path: Path) -> None:
    tok.save(str(tmp_path / "t"))
    back = ImageTokenizer.load(str(tmp_path / "t"))
    assert back.spec == tok.spec
    img = tok.example(1)
    assert torch.equal(back.encode(img), tok.encode(img))
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["spec"]["fingerprint"] == tok.spec.fingerprint
    cfg["config"]["factor"] = 5
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="factor=5"):
        ImageTokenizer.load(str(tmp_path / "t"))


# ---- files -------------------------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels in a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_reads_formats_modes_and_exif(tmp_path: Path) -> None:
    ramp = torch.linspace(0, 1, 30)[None, None, :] * torch.linspace(0.2, 1, 20)[None, :, None]
    rgb = (torch.stack([ramp[0], 1 - ramp[0], ramp[0].flip(0)]) * 255).round().to(torch.uint8)  # smooth, JPEG-friendly
    pil = Image.fromarray(rgb.permute(1, 2, 0).numpy())
    pil.save(tmp_path / "a.png")
    assert torch.equal((load_image(tmp_path / "a.png") * 255).round().to(torch.uint8), rgb)
    pil.save(tmp_path / "a.webp", lossless=True)
    assert torch.allclose(load_image(tmp_path / "a.webp"), load_image(tmp_path / "a.png"))
    pil.save(tmp_path / "a.jpg", quality=95)
    assert (load_image(tmp_path / "a.jpg") - load_image(tmp_path / "a.png")).abs().mean() < 0.02
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert load_image(tmp_path / "a.gif")[:, 0, 0].tolist() == [1.0, 0.0, 0.0]  # first frame
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert torch.all(load_image(tmp_path / "clear.png") == 1.0)  # transparent -> white
    Image.new("L", (4, 4), 128).save(tmp_path / "gray.png")
    g = load_image(tmp_path / "gray.png")
    assert g.shape == (3, 4, 4) and torch.allclose(g, torch.full_like(g, 128 / 255))
    Image.new("I;16", (4, 4), 65535).save(tmp_path / "g16.png")
    assert torch.all(load_image(tmp_path / "g16.png") == 1.0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.new("RGB", (30, 20), (0, 255, 0)).save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").shape == (3, 30, 20)


def test_read_fits_the_tokenizer(tok: ImageTokenizer, tmp_path: Path) -> None:
    Image.new("RGB", (100, 50), (10, 200, 30)).save(tmp_path / "wide.png")
    img = tok.read(str(tmp_path / "wide.png"))
    assert img.shape == (3, 32, 64)  # shorter side -> 32, aspect kept, multiples of 4
    assert fit_image(torch.rand(3, 50, 71), side=32, multiple=4, max_side=40).shape == (3, 32, 40)


def test_bad_files_raise_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "huge.png").write_bytes(_png_header(8_000, 6_000))
    for name, message in (("empty", "empty"), ("junk", "not a readable image"), ("cut", "corrupt or truncated"),
                          ("huge", "megapixel limit")):
        with pytest.raises(ImageFileError, match=message) as info:
            load_image(tmp_path / f"{name}.png")
        assert f"{name}.png" in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


# ---- metrics and training ------------------------------------------------------------------
def test_psnr_and_ssim_values() -> None:
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    assert torch.allclose(psnr(x, (x + 0.1).clamp(max=10)), torch.full((2,), 20.0), atol=1e-3)
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert float(ssim(noisy, x).mean()) < 0.9


@pytest.mark.slow
def test_short_training_learns_and_resumes(tmp_path: Path) -> None:
    tc = TrainConfig.debug()
    half = TrainConfig(**{**tc.to_dict(), "steps": tc.steps // 2})
    train(tmp_path / "run", ImageTokenizerConfig.debug(), half, progress=False)
    metrics = train(tmp_path / "run", ImageTokenizerConfig.debug(), tc, progress=False)  # resumes at step 20
    rows = MetricsLog.read(tmp_path / "run" / "metrics.jsonl")
    losses = [r["rec_loss"] for r in rows if "rec_loss" in r]
    steps = [r["step"] for r in rows if "rec_loss" in r]
    assert steps == sorted(steps) and steps[-1] == tc.steps  # resumed, not restarted
    assert losses[-1] < 0.6 * losses[0] and losses[-1] < 0.14, losses
    assert metrics["psnr"] > 14.0
    assert (tmp_path / "run" / "samples" / f"recon_{tc.steps:06d}.png").is_file()
    back = ImageTokenizer.load(str(tmp_path / "run" / "final"))
    assert back.encode(back.example(0)).shape == (66,)


def test_default_config_is_the_measured_vq_and_other_quantizers_get_their_own_options() -> None:
    c = ImageTokenizerConfig()
    assert c.quantizer == "vq" and c.quantizer_options == {"kmeans_init": True, "gradient": "rotation"}
    assert ImageTokenizerConfig.from_dict(c.to_dict()) == c  # options are written out, not implied
    fsq = ImageTokenizerConfig(quantizer="fsq", latent_dim=4, codebook_size=1024)
    assert fsq.quantizer_options == {}
    ImageAutoencoder(fsq)  # builds: no VQ options leak into FSQ
    with pytest.raises(ValueError, match=r"\['gradient', 'kmeans_init'\] are not options of 'fsq'"):
        ImageTokenizerConfig.from_dict({**c.to_dict(), "quantizer": "fsq", "latent_dim": 4})


def test_shipped_tokenizer_reconstructs_held_out_scenes() -> None:
    """The shipped checkpoint measured 32 dB on 256 held-out scenes; 32 of them must stay
    above 31 dB (a floor that catches a wrong or stale checkpoint, not noise)."""
    from tessera.modalities.image.train import EVAL_SEED, builtin_images, evaluate

    tok = ImageTokenizer.pretrained()
    assert evaluate(tok.model, builtin_images(32, start=EVAL_SEED))["psnr"] > 31.0


def test_shipped_tokenizer_decodes_every_code_its_layout_allows() -> None:
    """The layout must be exactly as wide as the quantizer's real codebook (an FSQ of
    8x5x5x5 has 1000 codes, not 1024), or the LLM can generate codes nobody can decode."""
    tok = ImageTokenizer.pretrained()
    layout = tok.spec.layout
    meta, codes = layout.unflatten(tok.encode(tok.example(0)))
    assert layout.levels == (tok.model.quantizer.codebook_size,)
    top = torch.full_like(codes, layout.levels[0] - 1)
    assert tok.decode(layout.flatten(top, meta)).shape == tok.example(0).shape


def test_train_command_switches_quantizer_with_its_own_defaults() -> None:
    from tessera.modalities.image.cli import build_parser, train_model_config

    def config(*flags: str) -> ImageTokenizerConfig:
        return train_model_config(build_parser().parse_args(["train", "--out", "x", *flags]))

    assert config() == ImageTokenizerConfig.builtin()
    fsq = config("--quantizer", "fsq")
    assert (fsq.quantizer, fsq.latent_dim, fsq.quantizer_options) == ("fsq", 4, {})
    ImageAutoencoder(fsq)  # no VQ options carried over
    vq = config("--preset", "debug", "--quantizer", "vq", "--codebook-size", "128")
    assert (vq.quantizer, vq.latent_dim, vq.codebook_size, vq.quantizer_options) == (
        "vq", 8, 128, {"kmeans_init": True, "gradient": "rotation"})
    assert config("--quantizer", "vq") == ImageTokenizerConfig.builtin()  # the same quantizer keeps its options
