"""Speech section of the tokenizer benchmark (issue 6): the shipped speech codec against a
quantized-mel + Griffin-Lim baseline at the same bitrate, on held-out built-in speech.

Both methods are scored in the same run on the same held-out clips (seeds from
``HELD_OUT_BASE`` upwards, which no training run uses): log-mel distance (lower is
better), SI-SNR in dB (higher is better), bitrate (kbps), tokens per second, and encode /
decode real-time factors (seconds of compute per second of audio) as wall time and as CPU
time summed over threads (the machine may be shared). The codec also reports code
utilization per residual level, and is scored with fewer levels (quantizer dropout makes
every prefix decodable) against the baseline at each of those bitrates.

The baseline's split of each bitrate into (frame rate, mel bins, bits per bin) is chosen
once by :func:`~tessera.modalities.speech.baseline.select_config`: quantizers fitted on
training clips (seeds ``0..``), the split scored on a few other training clips with fewer
Griffin-Lim iterations; only the chosen split is then run on the held-out clips with the
full iteration count. The codec runs on ``--threads`` threads, the baseline on
``--baseline-threads`` (Griffin-Lim is FFT-bound and slower with two threads on a busy
machine).

    python benchmarks/tokenizers_speech.py --quick --json out/speech.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

HELD_OUT_CLIPS = {True: 12, False: 48}
FIT_CLIPS = {True: 16, False: 96}
VAL_CLIPS = {True: 2, False: 8}
SEARCH_ITERS = {True: 8, False: 32}
TIMING_SECONDS = 10.0


def _rtf(fn: Callable[[], Any], seconds: float, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds per second of audio, after one warm-up call."""
    fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return (
        (time.perf_counter() - wall) / repeats / seconds,
        (time.process_time() - cpu) / repeats / seconds,
    )


def _print_table(rows: list[dict[str, Any]]) -> None:
    cols = [
        ("method", "method", 44, "s"),
        ("kbps", "bitrate_kbps", 5, ".2f"),
        ("tok/s", "tokens_per_s", 5, "g"),
        ("mel", "mel_distance", 6, ".3f"),
        ("mel/base", "mel_ratio_to_baseline", 8, ".3f"),
        ("SI-SNR", "si_snr_db", 7, ".2f"),
        ("dSI-SNR", "si_snr_gain_db", 7, ".2f"),
        ("minutil", "min_utilization", 7, ".3f"),
        ("encRTF", "encode_rtf", 7, ".4f"),
        ("encCPU", "encode_rtf_cpu", 7, ".4f"),
        ("decRTF", "decode_rtf", 7, ".4f"),
        ("decCPU", "decode_rtf_cpu", 7, ".4f"),
    ]
    print("  ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, _, w, _) in enumerate(cols)))
    for row in rows:
        if "mel_distance" not in row:
            continue
        cells = []
        for i, (_, key, w, fmt) in enumerate(cols):
            v = row.get(key)
            text = "-" if v is None else format(v, fmt)
            cells.append(f"{text:>{w}}" if i else f"{text:<{w}}")
        print("  ".join(cells))


def run(
    quick: bool, *, checkpoint: str | None = None, threads: int = 2, baseline_threads: int = 1
) -> list[dict[str, Any]]:
    """Rows of the speech section (``quick``: fewer clips and a cheaper baseline search)."""
    import torchaudio.transforms as AT
    from tessera.modalities.speech import SpeechTokenizer
    from tessera.modalities.speech.baseline import MelGriffinLim, select_config
    from tessera.modalities.speech.codec import mel_distance
    from tessera.modalities.speech.train import HELD_OUT_BASE, SpokenCorpus, evaluate, si_snr

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    tok = SpeechTokenizer.pretrained() if checkpoint is None else SpeechTokenizer.load(checkpoint)
    codec, c = tok.codec.eval(), tok.config
    sr = tok.sample_rate
    held_out = SpokenCorpus.build(range(HELD_OUT_BASE, HELD_OUT_BASE + HELD_OUT_CLIPS[quick]))
    seconds = held_out.seconds
    stretch = torch.cat(held_out.audio)[: int(TIMING_SECONDS * sr)]  # one stretch for all timings
    stretch_s = stretch.numel() / sr
    bits_per_code = float(torch.log2(torch.tensor(float(c.codebook_size))))

    # 1. the codec: timings at all levels, quality at every level count
    with torch.inference_mode():
        codes = codec.encode_codes(stretch[None])
        enc = _rtf(lambda: codec.encode_codes(stretch[None]), stretch_s, 3)
        dec = _rtf(lambda: codec.decode_codes(codes), stretch_s, 3)
    codec_rows: dict[int, dict[str, Any]] = {}
    for k in range(c.num_levels, 0, -1):
        report = evaluate(codec, held_out, n_levels=k)
        full = k == c.num_levels
        codec_rows[k] = {
            "section": "speech",
            "method": f"codec ({k}/{c.num_levels} levels)",
            "levels": k,
            "bitrate_kbps": c.frame_rate * k * bits_per_code / 1000,
            "tokens_per_s": c.frame_rate * k,
            "mel_distance": round(report["mel_distance"], 4),
            "si_snr_db": round(report["si_snr"], 2),
            "min_utilization": round(report["min_utilization"], 4),
            "utilization": [round(u, 4) for u in report["utilization"]],
            "encode_rtf": round(enc[0], 4) if full else None,
            "encode_rtf_cpu": round(enc[1], 4) if full else None,
            "decode_rtf": round(dec[0], 4) if full else None,
            "decode_rtf_cpu": round(dec[1], 4) if full else None,
            "threads": threads,
            "clips": report["clips"],
            "seconds": round(seconds, 1),
        }

    # 2. the Griffin-Lim baseline at each of those bitrates, same held-out clips
    torch.set_num_threads(baseline_threads)
    mel = AT.MelSpectrogram(sample_rate=sr, n_fft=1024, hop_length=256, n_mels=80, power=1.0)
    n_fit, n_val = FIT_CLIPS[quick], VAL_CLIPS[quick]
    fit = SpokenCorpus.build(range(n_fit)).audio  # training seeds, never the held-out ones
    val = SpokenCorpus.build(range(n_fit, n_fit + n_val)).audio
    rows: list[dict[str, Any]] = []
    for k, ours in codec_rows.items():
        cfg, search = select_config(
            ours["bitrate_kbps"] * 1000, fit, val, griffin_lim_iters=SEARCH_ITERS[quick]
        )
        base = MelGriffinLim(cfg).fit(fit)
        torch.manual_seed(0)  # Griffin-Lim starts from a random phase
        mels, snrs = [], []
        for wav in held_out.audio:
            out = base.decode(base.encode(wav), wav.numel())
            mels.append(float(mel_distance(mel(out), mel(wav))))
            snrs.append(float(si_snr(out, wav)))
        baseline = {
            "section": "speech",
            "method": f"mel+griffin-lim {cfg.frame_rate:g} Hz x {cfg.n_mels} mels x {cfg.bits} bit",
            "levels": k,
            "bitrate_kbps": cfg.bitrate / 1000,
            "tokens_per_s": None,
            "mel_distance": round(sum(mels) / len(mels), 4),
            "si_snr_db": round(sum(snrs) / len(snrs), 2),
            "encode_rtf": None,
            "encode_rtf_cpu": None,
            "decode_rtf": None,
            "decode_rtf_cpu": None,
            "threads": baseline_threads,
            "griffin_lim_iters": cfg.griffin_lim_iters,
            "search": [
                {key: s[key] for key in ("frame_rate", "n_mels", "bits", "val_mel_distance")} for s in search
            ],
            "clips": len(held_out.audio),
            "seconds": round(seconds, 1),
        }
        if k == c.num_levels:  # time the baseline at the full bitrate, on the timing stretch
            base_codes = base.encode(stretch)
            b_enc = _rtf(partial(base.encode, stretch), stretch_s, 1)
            b_dec = _rtf(partial(base.decode, base_codes, stretch.numel()), stretch_s, 1)
            for name, (wall, cpu) in (("encode", b_enc), ("decode", b_dec)):
                baseline[f"{name}_rtf"], baseline[f"{name}_rtf_cpu"] = round(wall, 4), round(cpu, 4)
        ours["mel_ratio_to_baseline"] = round(ours["mel_distance"] / baseline["mel_distance"], 3)
        ours["si_snr_gain_db"] = round(ours["si_snr_db"] - baseline["si_snr_db"], 2)
        rows += [ours, baseline]
    torch.set_num_threads(threads_before)

    # 3. the figures of the issue, checked
    full, full_base = rows[0], rows[1]
    rows.append(
        {
            "section": "speech",
            "method": "checks",
            "mel_better_than_baseline": full["mel_distance"] < full_base["mel_distance"],
            "si_snr_better_than_baseline": full["si_snr_db"] > full_base["si_snr_db"],
            "mel_better_at_every_level_count": all(
                r["mel_ratio_to_baseline"] < 1 for r in codec_rows.values()
            ),
            "utilization_at_least_90pct_every_level": full["min_utilization"] >= 0.9,
            "tokens_per_s_at_most_100": full["tokens_per_s"] <= 100,
            "decode_rtf_at_most_0.05": full["decode_rtf"] <= 0.05,
            "decode_rtf_cpu_at_most_0.05x_threads": full["decode_rtf_cpu"] <= 0.05 * threads,
        }
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{HELD_OUT_CLIPS[True]} held-out clips instead of {HELD_OUT_CLIPS[False]}, a cheaper baseline search",
    )
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--checkpoint", help="speech tokenizer folder (default: the shipped weights)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for the codec (timed)")
    p.add_argument("--baseline-threads", type=int, default=1, help="CPU threads for Griffin-Lim")
    args = p.parse_args(argv)
    for name in ("threads", "baseline_threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    rows = run(
        args.quick, checkpoint=args.checkpoint, threads=args.threads, baseline_threads=args.baseline_threads
    )
    for row in rows:
        print(json.dumps(row))
    print()
    _print_table(rows)
    print(json.dumps(rows[-1]))
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
