"""The speech tokenizer plugin: a neural audio codec with residual quantization.

``SpeechTokenizer`` (registered as ``"speech"``, media kind ``"audio"``) turns float32
mono 16 kHz waveforms into local ids and back with :class:`~.codec.SpeechCodec`
(25 Hz frames × 4 residual levels of 256 codes = 100 tokens/s, 800 bit/s). Its token
layout is ``"variable"``: every 40 ms frame contributes one token per level (level 0
first), the span is closed by the vocabulary's end token, and the decoder knows the
duration by counting frames (``frames × 640`` samples). The maximum duration is the
codec config's ``max_seconds``.

    tok = SpeechTokenizer.pretrained()          # the shipped checkpoint in weights/
    ids = tok.encode(tok.read("hello.wav"))      # 1-D LongTensor of local ids
    tok.write(tok.decode(ids), "again.wav")
    coarse = tok.decode(ids, levels=1)           # drop residual levels: 200 bit/s

The built-in spoken world (captions spoken by eSpeak NG) is in :mod:`.synth`, the
training recipe in :mod:`.train`, the Griffin-Lim baseline in :mod:`.baseline`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from ...core.checkpoint import sha256_tensors
from ...core.registry import register_modality
from ...core.spec import LayoutError, ModalitySpec, TokenLayout
from ...core.tokenizer_files import (
    load_weights,
    pretrained_folder,
    read_tokenizer_folder,
    save_tokenizer_folder,
)
from .codec import CodecConfig, SpeechCodec
from .io import AUDIO_EXTENSIONS, AudioError, check_audio, read_audio, write_audio

__all__ = ["SpeechTokenizer", "CodecConfig", "AudioError", "WEIGHTS_DIR"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
"""The shipped checkpoint (reproduce with the command in weights/README.md)."""

_FORMAT_VERSION = "1"


@register_modality
class SpeechTokenizer:
    """Speech ↔ local ids through a residual-VQ neural codec (see the module docstring)."""

    name: ClassVar[str] = "speech"
    media_kind: ClassVar[str] = "audio"
    file_extensions: ClassVar[tuple[str, ...]] = AUDIO_EXTENSIONS
    sample_rate: ClassVar[int] = 16_000

    def __init__(self, config: CodecConfig | None = None, codec: SpeechCodec | None = None) -> None:
        config = config or (codec.config if codec is not None else CodecConfig())
        if config.sample_rate != self.sample_rate:
            raise ValueError(
                f"CodecConfig.sample_rate={config.sample_rate}; the speech tokenizer works at {self.sample_rate} Hz"
            )
        self.config = config
        self.codec = (codec or SpeechCodec(config)).eval()

    # ---- the contract --------------------------------------------------------
    @property
    def layout(self) -> TokenLayout:
        c = self.config
        return TokenLayout(kind="variable", levels=(c.codebook_size,) * c.num_levels, max_steps=c.max_frames)

    @property
    def spec(self) -> ModalitySpec:
        c = self.config
        return ModalitySpec(
            name=self.name,
            version=_FORMAT_VERSION,
            media_kind=self.media_kind,
            layout=self.layout,
            fingerprint=sha256_tensors(self.codec.state_dict()),
            extra={
                "sample_rate": c.sample_rate,
                "frame_rate": c.frame_rate,
                "samples_per_step": c.frame_samples,
                "tokens_per_second": c.tokens_per_second,
                "bitrate": c.bitrate,
                "max_seconds": c.max_seconds,
            },
        )

    def encode(self, media: Tensor) -> Tensor:
        """float32 ``(samples,)`` mono 16 kHz in [-1, 1] → 1-D local ids (frames × levels)."""
        audio = check_audio(media, sample_rate=self.sample_rate, max_seconds=self.config.max_seconds)
        codes = self.codec.encode_codes(audio[None])[0]  # (F, L)
        return self.layout.flatten(codes)

    def decode(self, ids: Tensor, *, levels: int | None = None) -> Tensor:
        """Local ids → float32 ``(frames * 640,)`` waveform. ``levels=k`` decodes from the
        first ``k`` residual levels only (a coarser, lower-bitrate reconstruction)."""
        _, codes = self.layout.unflatten(ids)  # (F, L)
        L = self.config.num_levels
        if levels is not None and not 1 <= levels <= L:
            raise LayoutError(
                f"levels={levels}; the speech codec has levels 1..{L}, pass one of them or None"
            )
        wav = self.codec.decode_codes(codes[None, :, : levels or L])[0]
        return wav.clamp(-1.0, 1.0)

    def read(self, path: str | os.PathLike) -> Tensor:
        return read_audio(path, sample_rate=self.sample_rate, max_seconds=self.config.max_seconds)

    def write(self, media: Tensor, path: str | os.PathLike) -> None:
        write_audio(media, path, sample_rate=self.sample_rate)

    def save(self, path: str | os.PathLike) -> None:
        save_tokenizer_folder(
            path, state=self.codec.state_dict(), config_key="codec", config=self.config.to_dict(),
            spec=self.spec, format_version=_FORMAT_VERSION,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> SpeechTokenizer:
        raw, state = read_tokenizer_folder(path, config_key="codec", format_version=_FORMAT_VERSION)
        config = CodecConfig.from_dict(raw)
        return cls(config, load_weights(SpeechCodec(config), state, path))

    @classmethod
    def pretrained(cls) -> SpeechTokenizer:
        """The checkpoint shipped in :data:`WEIGHTS_DIR`."""
        return cls.load(pretrained_folder(WEIGHTS_DIR, modality="speech", hint="train one (see weights/README.md)"))

    @classmethod
    def debug(cls) -> SpeechTokenizer:
        torch.manual_seed(0)
        return cls(CodecConfig.debug())

    def example(self, seed: int) -> Tensor:
        """Built-in spoken caption ``seed`` (eSpeak NG), float32 mono 16 kHz, padded with
        silence to whole 40 ms frames (so it decodes to exactly its own length) and cut
        to the tokenizer's maximum duration."""
        from .synth import spoken_clip

        audio = spoken_clip(seed).audio
        step = self.config.frame_samples
        limit = int(self.config.max_seconds * self.sample_rate) // step * step
        audio = audio[:limit]
        return torch.nn.functional.pad(audio, (0, -audio.numel() % step))

    def __repr__(self) -> str:
        c = self.config
        return (
            f"SpeechTokenizer({c.frame_rate:g} Hz x {c.num_levels} levels x {c.codebook_size} codes = "
            f"{c.tokens_per_second:g} tokens/s, {c.bitrate / 1000:g} kbps)"
        )
