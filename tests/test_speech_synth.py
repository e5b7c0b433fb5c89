"""The built-in spoken world: eSpeak NG through ctypes, deterministic per seed."""

from __future__ import annotations

import pytest
import torch
from tessera.modalities.speech import synth
from tessera.modalities.world import visual


def test_same_seed_gives_the_same_samples_whatever_was_spoken_before() -> None:
    a = synth.spoken_clip(3)
    synth.spoken_clip(4)  # eSpeak keeps state between utterances; the fork must hide it
    b = synth.spoken_clip(3)
    assert torch.equal(a.audio, b.audio)
    assert (a.voice, a.rate, a.pitch, a.transcript) == (b.voice, b.rate, b.pitch, b.transcript)


def test_clip_is_16khz_speech_with_its_caption_as_transcript() -> None:
    clip = synth.spoken_clip(2)
    assert clip.transcript == visual.sample_image_scene(2).caption
    assert synth.spoken_clip(5).transcript == visual.sample_video_scene(5).caption
    audio = clip.audio
    assert audio.dtype == torch.float32 and audio.ndim == 1
    words = len(clip.transcript.split())
    seconds = audio.numel() / synth.SAMPLE_RATE
    # eSpeak speaks at clip.rate words per minute (plus pauses): the duration must agree
    assert 0.6 * words / clip.rate * 60 < seconds < 2.0 * words / clip.rate * 60 + 0.5
    assert 0.2 < float(audio.abs().max()) <= 1.0
    # speech, not noise: most energy below 4 kHz
    spec = torch.stft(audio, 512, 128, window=torch.hann_window(512), return_complex=True).abs() ** 2
    low = spec[: 512 * 4000 // synth.SAMPLE_RATE].sum()
    assert low / spec.sum() > 0.8


def test_seeds_vary_voice_rate_and_pitch() -> None:
    clips = [synth.spoken_clip(s) for s in range(4)]
    assert len({c.voice for c in clips}) >= 3
    assert len({c.rate for c in clips}) >= 3 and len({c.pitch for c in clips}) >= 3
    assert all(c.voice in synth.VOICES for c in clips)


def test_pitch_parameter_moves_the_fundamental() -> None:
    def f0(audio: torch.Tensor) -> float:  # autocorrelation peak in 60..400 Hz
        x = audio[4000:12000] - audio[4000:12000].mean()
        ac = torch.fft.irfft(torch.fft.rfft(x, 2 * x.numel()).abs() ** 2)[: x.numel()]
        lo, hi = synth.SAMPLE_RATE // 400, synth.SAMPLE_RATE // 60
        return synth.SAMPLE_RATE / (lo + int(ac[lo:hi].argmax()))

    text = "a red circle on the left of a blue square"
    assert f0(synth.synthesize(text, pitch=85)) > 1.2 * f0(synth.synthesize(text, pitch=15))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": "   "}, "text is empty"),
        ({"text": "hello", "rate": 20}, "rate=20"),
        ({"text": "hello", "pitch": 101}, "pitch=101"),
        ({"text": "hello", "voice": "no-such-voice"}, "no voice 'no-such-voice'"),
    ],
)
def test_bad_requests_raise_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synth.synthesize(**kwargs)
