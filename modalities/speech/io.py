"""Audio file I/O for the speech tokenizer: WAV / FLAC / OGG through soundfile.

Reading returns the canonical audio media of Tessera: float32 ``(samples,)`` mono at the
tokenizer's sample rate. Stereo is mixed down explicitly (mean of the channels), other
sample rates are resampled with torchaudio, and input the codec cannot represent is
refused with a :class:`AudioError` naming the file, the limit and the fix: an empty
file, silence, NaN/inf samples, clipping, samples outside [-1, 1], or a clip longer than
the tokenizer's maximum duration. Nothing is silently repaired.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioError",
    "SILENCE_PEAK",
    "CLIP_LEVEL",
    "MAX_CLIPPED_FRACTION",
    "check_audio",
    "read_audio",
    "write_audio",
]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
SILENCE_PEAK = 1e-4  # peak below -80 dBFS counts as silence
CLIP_LEVEL = 0.999  # a sample at or above this magnitude is at full scale
MAX_CLIPPED_FRACTION = 0.01  # more than 1% of samples at full scale = clipped recording


class AudioError(ValueError):
    """Audio that the speech tokenizer refuses (the message names the file and the limit)."""


def check_audio(audio: Tensor, *, sample_rate: int, max_seconds: float, where: str = "audio") -> Tensor:
    """Validate canonical audio (float ``(samples,)`` in [-1, 1]); returns it as float32.

    ``where`` names the source (a file path) in the error messages."""
    if not torch.is_tensor(audio):
        raise AudioError(f"{where}: expected a float tensor of shape (samples,), got {type(audio).__name__}")
    if audio.ndim != 1:
        raise AudioError(
            f"{where}: audio has shape {tuple(audio.shape)}, the speech tokenizer takes mono (samples,); "
            f"mix channels down first, e.g. audio.mean(0)"
        )
    if not audio.is_floating_point():
        raise AudioError(
            f"{where}: audio dtype is {audio.dtype}; convert to float32 in [-1, 1] (int16 / 32768)"
        )
    audio = audio.float()
    n = audio.numel()
    if n == 0:
        raise AudioError(f"{where}: the audio is empty (0 samples); give at least one frame of sound")
    if not torch.isfinite(audio).all():
        bad = int((~torch.isfinite(audio)).sum())
        raise AudioError(f"{where}: {bad} of {n} samples are NaN or inf; the file is corrupt, re-export it")
    seconds = n / sample_rate
    if seconds > max_seconds:
        raise AudioError(
            f"{where}: {seconds:.2f} s is longer than the tokenizer's limit of {max_seconds:g} s; "
            f"cut it into pieces of at most {max_seconds:g} s"
        )
    peak = float(audio.abs().max())
    if peak > 1.0 + 1e-6:
        raise AudioError(f"{where}: peak {peak:.3f} is outside [-1, 1]; normalise the audio (audio / peak)")
    if peak < SILENCE_PEAK:
        raise AudioError(
            f"{where}: the audio is silent (peak {peak:.1e} < {SILENCE_PEAK:g}, about -80 dBFS); "
            f"check the recording or the input gain"
        )
    clipped = float((audio.abs() >= CLIP_LEVEL).float().mean())
    if clipped > MAX_CLIPPED_FRACTION:
        raise AudioError(
            f"{where}: {clipped:.1%} of samples sit at full scale (limit {MAX_CLIPPED_FRACTION:.0%}); the "
            f"recording is clipped, record or export it again at a lower gain"
        )
    return audio


def read_audio(path: str | os.PathLike, *, sample_rate: int, max_seconds: float) -> Tensor:
    """A WAV/FLAC/OGG file → float32 ``(samples,)`` mono at ``sample_rate``, validated."""
    import soundfile as sf

    path = Path(path)
    if path.suffix.lower() not in AUDIO_EXTENSIONS:
        raise AudioError(f"{path}: extension {path.suffix!r} is not supported; use one of {AUDIO_EXTENSIONS}")
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (frames, channels)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(
            f"{path}: soundfile cannot decode it ({e}); is it a valid {path.suffix} file?"
        ) from e
    audio = torch.from_numpy(data).mean(dim=1)  # explicit mix-down of every channel
    if audio.numel() and rate != sample_rate:
        import torchaudio.functional as AF

        # check length in the source rate first: never resample an hour of audio to refuse it
        if audio.numel() / rate > max_seconds:
            return check_audio(audio, sample_rate=rate, max_seconds=max_seconds, where=str(path))
        audio = AF.resample(audio, rate, sample_rate)
    return check_audio(audio, sample_rate=sample_rate, max_seconds=max_seconds, where=str(path))


def write_audio(audio: Tensor, path: str | os.PathLike, *, sample_rate: int) -> None:
    """Write float ``(samples,)`` in [-1, 1] as WAV/FLAC (16-bit PCM) or OGG (Vorbis)."""
    import soundfile as sf

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in AUDIO_EXTENSIONS:
        raise AudioError(f"{path}: extension {path.suffix!r} is not supported; use one of {AUDIO_EXTENSIONS}")
    audio = torch.as_tensor(audio).detach().float().cpu()
    if audio.ndim != 1:
        raise AudioError(f"{path}: audio has shape {tuple(audio.shape)}, expected mono (samples,)")
    if not torch.isfinite(audio).all():
        raise AudioError(f"{path}: audio holds NaN/inf samples; refusing to write a corrupt file")
    path.parent.mkdir(parents=True, exist_ok=True)
    subtype = "VORBIS" if suffix == ".ogg" else "PCM_16"
    sf.write(str(path), audio.clamp(-1.0, 1.0).numpy(), sample_rate, subtype=subtype)
