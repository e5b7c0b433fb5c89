"""The speech tokenizer plugin: codec shapes, level dropping, file I/O and its errors,
save/load, the CLI, the Griffin-Lim baseline and a short training run."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tessera.core.checkpoint import CheckpointError
from tessera.core.registry import get_modality
from tessera.core.spec import LayoutError
from tessera.modalities.speech import SpeechTokenizer, cli
from tessera.modalities.speech.baseline import (
    MelGriffinLim,
    MelGriffinLimConfig,
    configs_at_bitrate,
    select_config,
)
from tessera.modalities.speech.codec import CodecConfig
from tessera.modalities.speech.train import SpokenCorpus, TrainConfig, si_snr, train

SR = 16_000


@pytest.fixture(scope="module")
def tok() -> SpeechTokenizer:
    return SpeechTokenizer.debug()


def tone(seconds: float, amplitude: float = 0.5, rate: int = SR) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return amplitude * torch.sin(2 * math.pi * 220 * t) * (0.6 + 0.4 * torch.sin(2 * math.pi * 3 * t))


def test_registered_as_audio_with_a_variable_layout(tok: SpeechTokenizer) -> None:
    assert get_modality("speech") is SpeechTokenizer
    spec = tok.spec
    assert (spec.name, spec.media_kind, spec.layout.kind) == ("speech", "audio", "variable")
    c = tok.config
    assert spec.layout.levels == (c.codebook_size,) * c.num_levels
    assert spec.layout.max_steps == c.max_frames == int(c.max_seconds * SR) // 640 + 1
    shipped = CodecConfig()  # the shipped recipe stays within the LLM's 100 tokens/s
    assert (shipped.frame_rate, shipped.num_levels, shipped.tokens_per_second, shipped.bitrate) == (
        25,
        4,
        100,
        800,
    )


@pytest.mark.parametrize("samples", [1, 639, 640, 16_123])
def test_decoded_length_matches_the_input_within_one_frame(tok: SpeechTokenizer, samples: int) -> None:
    audio = tone(1.2)[:samples] if samples > 1 else torch.tensor([0.3])
    ids = tok.encode(audio)
    frames = -(-samples // 640)
    assert ids.numel() == frames * tok.config.num_levels
    out = tok.decode(ids)
    assert out.dtype == torch.float32 and 0 <= out.numel() - samples < 640
    assert torch.isfinite(out).all() and out.abs().max() <= 1.0


def test_dropping_levels_still_decodes(tok: SpeechTokenizer) -> None:
    ids = tok.encode(tone(1.0))
    outs = [tok.decode(ids, levels=k) for k in range(1, tok.config.num_levels + 1)]
    assert all(o.shape == outs[-1].shape and torch.isfinite(o).all() for o in outs)
    assert not torch.equal(outs[0], outs[-1])  # the finer levels change the waveform
    with pytest.raises(LayoutError, match="levels=5; the speech codec has levels 1..4"):
        tok.decode(ids, levels=5)


def test_save_load_keeps_the_fingerprint_and_it_tracks_the_weights(
    tok: SpeechTokenizer, tmp_path: Path
) -> None:
    tok.save(tmp_path / "a")
    back = SpeechTokenizer.load(tmp_path / "a")
    assert back.spec == tok.spec
    with torch.no_grad():
        back.codec.head.bias.add_(1e-3)
    assert back.spec.fingerprint != tok.spec.fingerprint
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    meta["codec"]["channels"] = 48
    (tmp_path / "a" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match config.json"):
        SpeechTokenizer.load(tmp_path / "a")


@pytest.mark.parametrize("ext", [".wav", ".flac", ".ogg"])
def test_write_read_round_trip(tok: SpeechTokenizer, tmp_path: Path, ext: str) -> None:
    audio = tone(0.5)
    tok.write(audio, tmp_path / f"a{ext}")
    back = tok.read(tmp_path / f"a{ext}")
    assert back.shape == audio.shape
    tolerance = 0.05 if ext == ".ogg" else 1e-4  # Vorbis is lossy, PCM_16 is not
    assert float((back - audio).abs().mean()) < tolerance


def test_stereo_is_mixed_down_and_resampled(tok: SpeechTokenizer, tmp_path: Path) -> None:
    import torchaudio.functional as AF

    left = tone(1.0, 0.6, rate=22_050)
    stereo = torch.stack([left, 0.5 * left], dim=1)  # (frames, channels)
    sf.write(tmp_path / "s.wav", stereo.numpy(), 22_050, subtype="FLOAT")
    back = tok.read(tmp_path / "s.wav")
    expected = AF.resample(0.75 * left, 22_050, SR)
    assert back.shape == expected.shape == (SR,)
    torch.testing.assert_close(back, expected, atol=1e-5, rtol=0)


BAD_FILES = {
    "empty": (np.zeros(0, np.float32), "FLOAT", "the audio is empty"),
    "silent": (np.zeros(SR, np.float32), "FLOAT", r"silent \(peak 0.0e\+00 < 0.0001, about -80 dBFS\)"),
    "too_long": (tone(5.0).numpy(), "PCM_16", r"5.00 s is longer than the tokenizer's limit of 4 s"),
    "nan": (
        np.where(np.arange(SR) == 7, np.nan, tone(1.0).numpy()).astype(np.float32),
        "FLOAT",
        "1 of 16000 samples are NaN",
    ),
    "clipped": (np.clip(tone(1.0, 3.0).numpy(), -1, 1), "FLOAT", r"sit at full scale \(limit 1%\).*clipped"),
    "too_loud": (tone(1.0, 2.0).numpy(), "FLOAT", r"peak 2.000 is outside \[-1, 1\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_raise_naming_the_file_and_the_limit(
    tok: SpeechTokenizer, tmp_path: Path, case: str
) -> None:
    data, subtype, message = BAD_FILES[case]
    path = tmp_path / f"{case}.wav"
    sf.write(path, data, SR, subtype=subtype)
    with pytest.raises(ValueError, match=message) as err:
        tok.read(path)
    assert str(path) in str(err.value)


def test_bad_arguments_raise_value_error(tok: SpeechTokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shape \(2, 100\).*mono"):
        tok.encode(torch.zeros(2, 100))
    with pytest.raises(ValueError, match="dtype is torch.int16"):
        tok.encode(torch.ones(100, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"'.mp3' is not supported"):
        tok.read(tmp_path / "x.mp3")
    with pytest.raises(ValueError, match="no such file"):
        tok.read(tmp_path / "missing.wav")


def test_cli_encode_decode_round_trip(tok: SpeechTokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "ckpt")
    tok.write(tone(0.7), tmp_path / "in.wav")
    ck = ["--checkpoint", str(tmp_path / "ckpt")]
    assert cli.main(["encode", str(tmp_path / "in.wav"), "--out", str(tmp_path / "in.json"), *ck]) == 0
    ids = json.loads((tmp_path / "in.json").read_text())["ids"]
    assert len(ids) == 18 * 4  # ceil(11200 / 640) frames x 4 levels
    assert (
        cli.main(
            ["decode", str(tmp_path / "in.json"), "--out", str(tmp_path / "out.flac"), "--levels", "2", *ck]
        )
        == 0
    )
    assert sf.info(str(tmp_path / "out.flac")).frames == 18 * 640
    other = SpeechTokenizer(replace(CodecConfig.debug(), channels=24))
    other.save(tmp_path / "other")
    with pytest.raises(ValueError, match="decode with the checkpoint that encoded it"):
        cli.main(["decode", str(tmp_path / "in.json"), "--checkpoint", str(tmp_path / "other")])


def test_griffin_lim_baseline_spends_the_same_bits() -> None:
    configs = configs_at_bitrate(800)
    assert len(configs) >= 5 and all(c.bitrate == 800 for c in configs)
    clip = tone(1.0)
    base = MelGriffinLim(configs[0]).fit([clip, tone(0.8, 0.2)])
    codes = base.encode(clip)
    assert codes.shape == (configs[0].n_mels, math.ceil(configs[0].frame_rate))  # last frame padded
    assert 0 <= int(codes.min()) and int(codes.max()) < 2 ** configs[0].bits
    out = base.decode(codes, clip.numel())
    assert out.shape == clip.shape and float(out.abs().max()) > 0.01


def test_baseline_split_search_scores_every_split_and_rejects_unreachable_bitrates() -> None:
    fit, val = [tone(1.0), tone(0.8, 0.2)], [tone(0.6, 0.3)]
    cfg, scores = select_config(400, fit, val, griffin_lim_iters=2)
    assert cfg.bitrate == 400 and cfg.griffin_lim_iters == MelGriffinLimConfig().griffin_lim_iters
    assert len(scores) == len(configs_at_bitrate(400))
    assert min(s["val_mel_distance"] for s in scores) == next(
        s["val_mel_distance"]
        for s in scores
        if (s["frame_rate"], s["n_mels"], s["bits"]) == (cfg.frame_rate, cfg.n_mels, cfg.bits)
    )
    with pytest.raises(ValueError, match="bitrate=10 bit/s has no split"):
        select_config(10, fit, val)


def test_si_snr_is_scale_invariant_and_ranks_noise() -> None:
    x = tone(0.5)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert float(si_snr(3 * x, x)) > 60
    assert abs(float(si_snr(x + 0.1 * noise, x)) - float(si_snr(5 * (x + 0.1 * noise), x))) < 1e-4
    assert float(si_snr(x + 0.1 * noise, x)) > float(si_snr(x + noise, x))


@pytest.mark.slow
def test_short_training_run_lowers_the_spectral_loss_and_resumes(tmp_path: Path) -> None:
    corpus = SpokenCorpus.build(range(4))
    cfg = replace(TrainConfig.debug(), steps=30, sample_every=30, ckpt_every=15, lr=3e-3, warmup=5)
    _, history = train(cfg, tmp_path, corpus=corpus, progress=False)
    first, last = history[0]["mel"], (history[-1]["mel"] + history[-2]["mel"]) / 2
    assert history[-1]["step"] == 30
    assert last < 0.7 * first and last < 1.7, [h["mel"] for h in history]
    assert (tmp_path / "samples" / "step_30" / "0_decoded.wav").is_file()
    assert (tmp_path / "samples" / "step_30" / "0_decoded.png").is_file()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    _, more = train(replace(cfg, steps=35), tmp_path, corpus=corpus, resume=True, progress=False)
    assert [h["step"] for h in more] == [35]
    with pytest.raises(FileNotFoundError, match="start without --resume"):
        train(cfg, tmp_path / "fresh", corpus=corpus, resume=True, progress=False)


@pytest.mark.slow
def test_adversarial_option_trains_a_discriminator_and_keeps_its_state(tmp_path: Path) -> None:
    corpus = SpokenCorpus(audio=[tone(0.8), tone(0.6, 0.3)], transcripts=["a", "b"], seeds=[0, 1])
    cfg = replace(TrainConfig.debug(), steps=2, vq_warmup=0, log_every=1, adversarial=True, batch_size=2)
    _, history = train(cfg, tmp_path, corpus=corpus, progress=False)
    assert [h["step"] for h in history] == [1, 2]
    assert all(math.isfinite(h["disc"]) and h["disc"] > 0 for h in history)  # hinge loss of a real/fake pair
    assert (tmp_path / "disc_state" / "state.json").is_file()
