"""Grammar micro-benchmark: what constrained decoding (``tessera.core.grammar``) adds to
one decoding step, at batch 1 and 8, for vocabularies of about 4k and 16k ids.

Per step it times, on the same logits and the same valid token stream:
  * ``plain``: a logits step without grammar (softmax + multinomial sample);
  * ``mask``: ``grammar.mask`` (the (B, V) boolean mask);
  * ``apply``: ``grammar.apply`` (disallowed logits -> -inf, in place);
  * ``advance`` / ``advance_nocheck``: moving the state past the chosen tokens, with and
    without the validity check (the check costs one device sync);
and ``grammar`` = apply + advance_nocheck, what ``tessera.llm.generate`` adds to a
step, with its ratio to ``plain``. On the CPU the clock is this process's CPU time
(``time.process_time``), so other jobs on a shared machine barely inflate it; on CUDA
it is wall time with a synchronize. Phases alternate within every repeat and the median
repeat is reported.

    python benchmarks/grammar.py --quick [--json out.json] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from tessera.core.grammar import Grammar, GrammarState
from tessera.core.spec import MetaField, ModalitySpec, TokenLayout
from tessera.core.vocab import UnifiedVocab


def bench_vocab(target_size: int) -> UnifiedVocab:
    """An image grid (height/width meta), a 4-level speech codec and an action chunk,
    with text filling the vocabulary up to about ``target_size`` ids."""

    def spec(name: str, kind: str, layout: TokenLayout) -> ModalitySpec:
        return ModalitySpec(name=name, version="1", media_kind=kind, layout=layout, fingerprint=name)

    side = (MetaField(name="height", low=1, high=16), MetaField(name="width", low=1, high=16))
    specs = [
        spec("image", "image", TokenLayout(kind="grid", levels=(1024,), meta=side)),
        spec("speech", "audio", TokenLayout(kind="variable", levels=(256,) * 4, max_steps=500)),
        spec("actions", "actions", TokenLayout(kind="fixed", levels=(64, 64), steps=8)),
    ]
    media = UnifiedVocab.build(1, specs).size - 1
    return UnifiedVocab.build(max(1, target_size - media), specs)


def token_stream(g: Grammar, batch: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch) valid tokens: random logits with begin tokens made likely, so the
    stream passes through text and every kind of span."""
    gen = torch.Generator().manual_seed(seed)
    boost = torch.zeros(g.vocab_size)
    boost[[g.vocab.begin_id(n) for n in g.modalities]] = 8.0
    boost[g.eos_id] = -30.0
    state, out = g.start(batch), []
    for _ in range(steps):
        logits = g.apply(torch.randn(batch, g.vocab_size, generator=gen) + boost, state)
        tokens = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
        g.advance(state, tokens)
        out.append(tokens)
    return torch.stack(out)


def time_per_step(fn: Callable[[int], None], steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(steps):
            fn(i)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / steps * 1e6
    t = time.process_time()
    for i in range(steps):
        fn(i)
    return (time.process_time() - t) / steps * 1e6


def run(size: int, batch: int, steps: int, repeats: int, device: torch.device) -> dict[str, float]:
    g = Grammar(bench_vocab(size)).to(device)
    tokens = token_stream(Grammar(g.vocab), batch, steps, seed=size + batch).to(device)
    logits = torch.randn(8, batch, g.vocab_size, device=device)
    work = logits.clone()
    gen = torch.Generator(device=device).manual_seed(0)
    holder: dict[str, GrammarState] = {}

    def fresh() -> None:
        holder["s"] = g.start(batch)

    def plain(i: int) -> None:
        torch.multinomial(logits[i % 8].softmax(-1), 1, generator=gen)

    def mask(i: int) -> None:
        g.mask(holder["s"])
        g.advance(holder["s"], tokens[i], check=False)

    def apply(i: int) -> None:
        g.apply(work[i % 8], holder["s"])  # -inf stays -inf: the same work on every pass
        g.advance(holder["s"], tokens[i], check=False)

    def advance(i: int) -> None:
        g.advance(holder["s"], tokens[i])

    def advance_nocheck(i: int) -> None:
        g.advance(holder["s"], tokens[i], check=False)

    phases = {
        "plain": plain,
        "mask": mask,
        "apply": apply,
        "advance": advance,
        "advance_nocheck": advance_nocheck,
    }
    times: dict[str, list[float]] = {k: [] for k in phases}
    for _ in range(repeats):
        for name, fn in phases.items():
            fresh()
            times[name].append(time_per_step(fn, steps, device))
    result = {k: statistics.median(v) for k, v in times.items()}
    result["mask"] -= result["advance_nocheck"]  # mask() was timed with the advance that moves the state on
    result["apply"] -= result["advance_nocheck"]
    result["grammar"] = result["apply"] + result["advance_nocheck"]
    row = {"vocab_size": g.vocab_size, "batch": batch, **{f"{k}_us": round(v, 1) for k, v in result.items()}}
    return {**row, "grammar_vs_plain": round(result["grammar"] / result["plain"], 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats (seconds)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps, repeats = (200, 3) if args.quick else (1000, 5)
    rows = [run(size, batch, steps, repeats, device) for size in (4096, 16384) for batch in (1, 8)]
    cols = [
        "vocab_size",
        "batch",
        "plain_us",
        "mask_us",
        "apply_us",
        "advance_us",
        "advance_nocheck_us",
        "grammar_us",
        "grammar_vs_plain",
    ]
    print(
        f"grammar step cost on {device} ({args.threads} thread(s)), microseconds per step, median of {repeats}"
    )
    print(" ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>18}" for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": str(device), "threads": args.threads, "steps": steps, "rows": rows}, f, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
