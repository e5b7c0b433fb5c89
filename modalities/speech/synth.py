"""The built-in spoken world: captions of the built-in scenes spoken by eSpeak NG.

eSpeak NG (a formant synthesizer) ships inside the ``espeakng-loader`` wheel as a shared
library plus its data folder, so no system package and no network are needed. We drive
its C API through :mod:`ctypes`: ``espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS)`` with a
synth callback that appends every block of 16-bit samples to an in-memory buffer, then
``espeak_SetVoiceByName`` / ``espeak_SetParameter`` (rate, pitch, range) and
``espeak_Synth``. The native rate (22 050 Hz) is resampled to 16 kHz mono with torchaudio.

The library is not thread-safe and keeps state between utterances in C statics, so every
call goes through one lock and speaks in a forked child of the initialised library (see
:func:`_synth_forked`); eSpeak's own random generator is re-seeded per clip. A seed picks the caption, the voice, the speaking rate and the pitch; the same
seed always gives the same samples.
"""

from __future__ import annotations

import ctypes
import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "SAMPLE_RATE",
    "VOICES",
    "SpokenClip",
    "SynthError",
    "synthesize",
    "caption_for_seed",
    "spoken_clip",
]

SAMPLE_RATE = 16_000
# eSpeak NG voice variants ("language+variant"): several male, female and accented voices.
VOICES: tuple[str, ...] = (
    "en-us+m1",
    "en-us+m3",
    "en-us+f2",
    "en-us+f4",
    "en+m2",
    "en+m7",
    "en+f1",
    "en+f3",
    "en-gb-x-rp+m4",
    "en-us+klatt",
)
RATE_RANGE = (130, 210)  # words per minute
PITCH_RANGE = (30, 70)  # eSpeak pitch 0..100 (50 = voice default)

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4
_EXIT_BAD_VOICE, _EXIT_SYNTH_FAILED = 3, 4
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_native_rate = 0
_buffer: list[bytes] = []


class SynthError(RuntimeError):
    """eSpeak NG could not be loaded or refused a request."""


@dataclass(frozen=True)
class SpokenClip:
    """One spoken caption: float32 mono waveform at :data:`SAMPLE_RATE` and its transcript."""

    audio: Tensor
    transcript: str
    voice: str
    rate: int
    pitch: int
    seed: int


def _on_samples(wav: ctypes.POINTER(ctypes.c_short), n: int, events: int) -> int:
    if n > 0 and wav:
        _buffer.append(ctypes.string_at(wav, n * 2))
    return 0  # 0 = continue synthesis


_callback_ref = _CALLBACK(_on_samples)  # module-level: ctypes must keep the thunk alive


def _library() -> ctypes.CDLL:
    """Load and initialise libespeak-ng once (callers hold ``_lock``)."""
    global _lib, _native_rate
    if _lib is not None:
        return _lib
    try:
        import espeakng_loader
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise SynthError(
            "the spoken world needs the 'espeakng-loader' package; pip install espeakng-loader"
        ) from e
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synchronize.restype = ctypes.c_int
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    data_parent = str(Path(espeakng_loader.get_data_path()).parent).encode()
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_parent, 0)
    if rate <= 0:
        raise SynthError(f"espeak_Initialize failed (returned {rate}) with data under {data_parent.decode()}")
    lib.espeak_SetSynthCallback(_callback_ref)
    _lib, _native_rate = lib, rate
    return lib


def _synth_forked(text: str, *, voice: str, rate: int, pitch: int, seed: int) -> tuple[bytes, int]:
    """Synthesize in a forked child of the initialised-but-unused library.

    eSpeak keeps state between utterances in C statics (pitch flutter, wave phase), so the
    same request gives slightly different samples depending on what was spoken before.
    The parent only initialises the library; each utterance runs in a fresh fork that
    starts from that pristine state and sends its 16-bit samples back through a pipe.
    """
    lib = _library()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: speak, send the samples, exit without running Python cleanup
        code = 0
        try:
            os.close(read_fd)
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                code = _EXIT_BAD_VOICE
            else:
                for param, value in (
                    (_PARAM_RATE, rate),
                    (_PARAM_PITCH, pitch),
                    (_PARAM_RANGE, 50),
                    (_PARAM_VOLUME, 100),
                ):
                    lib.espeak_SetParameter(param, value, 0)
                lib.espeak_ng_SetRandSeed(seed & 0x7FFFFFFF)
                raw = text.encode("utf-8") + b"\0"
                if lib.espeak_Synth(raw, len(raw), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None) != 0:
                    code = _EXIT_SYNTH_FAILED
                lib.espeak_Synchronize()
                with os.fdopen(write_fd, "wb") as out:
                    out.write(b"".join(_buffer))
        except BaseException:
            code = _EXIT_SYNTH_FAILED
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as inp:
        pcm = inp.read()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == _EXIT_BAD_VOICE:
        raise ValueError(f"synthesize: eSpeak NG has no voice {voice!r}; use one of {VOICES}")
    if code != 0:
        raise SynthError(f"eSpeak NG failed (exit code {code}) on text {text[:40]!r} with voice {voice!r}")
    return pcm, _native_rate


def synthesize(
    text: str, *, voice: str = "en-us+m3", rate: int = 170, pitch: int = 50, seed: int = 0
) -> Tensor:
    """Speak ``text`` → float32 ``(samples,)`` at 16 kHz in [-1, 1]. eSpeak's noise and
    pitch jitter come from its own random generator, re-seeded with ``seed`` every call."""
    if not text.strip():
        raise ValueError("synthesize: text is empty; give at least one word to speak")
    if not 80 <= rate <= 450:
        raise ValueError(f"synthesize: rate={rate} words/minute is outside eSpeak's 80..450; pick e.g. 170")
    if not 0 <= pitch <= 100:
        raise ValueError(f"synthesize: pitch={pitch} is outside 0..100; 50 is the voice's default")
    import torchaudio.functional as AF

    with _lock:
        pcm, native = _synth_forked(text, voice=voice, rate=rate, pitch=pitch, seed=seed)
    wav = torch.frombuffer(bytearray(pcm), dtype=torch.int16).float() / 32768.0
    return AF.resample(wav, native, SAMPLE_RATE).clamp(-1.0, 1.0).contiguous()


def caption_for_seed(seed: int) -> str:
    """The caption of built-in scene ``seed``: an image scene for even seeds, a video
    scene (objects moving, bouncing, growing, changing colour) for odd ones."""
    from ..world import visual

    scene = visual.sample_video_scene(seed) if seed % 2 else visual.sample_image_scene(seed)
    return str(scene.caption)


def spoken_clip(seed: int) -> SpokenClip:
    """Built-in spoken caption ``seed``: the seed picks caption, voice, rate and pitch."""
    rng = random.Random(f"tessera-speech-{seed}")
    voice = rng.choice(VOICES)
    rate = rng.randint(*RATE_RANGE)
    pitch = rng.randint(*PITCH_RANGE)
    text = caption_for_seed(seed)
    audio = synthesize(text, voice=voice, rate=rate, pitch=pitch, seed=seed)
    return SpokenClip(audio=audio, transcript=text, voice=voice, rate=rate, pitch=pitch, seed=seed)
