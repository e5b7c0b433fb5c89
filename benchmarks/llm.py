"""LLM benchmark: Tessera's decoder (``tessera.llm.model``) against Hugging Face
``LlamaForCausalLM`` with the same weights (copied through ``tessera.llm.export``), same
config, same machine, same run.

Measures
  * training tokens/s, fp32 and bf16 autocast: forward + cross-entropy + backward + AdamW step,
    and MFU against the matmul peak measured in this run;
  * greedy generation tokens/s at batch 1 and batch 8 with a KV cache, against
    ``transformers`` ``generate`` (``min_new_tokens`` = ``max_new_tokens``, so equal lengths),
    ours both eager and with ``compile=True`` (``torch.compile`` of the decode step, compiled
    in the warm-up call, outside the timing; ``--no-compile`` skips it), theirs as
    ``transformers`` ships it (training likewise: eager, and compiled in place as
    ``tessera train --compile`` does);
  * the cost of grammar-constrained decoding (``tessera.core.grammar``) over unconstrained.

Time is this process's CPU time by default (``--clock cpu``): on a machine shared with
other jobs, wall time mostly measures how often the scheduler lets us run. With more than
one thread CPU time sums the threads (and their spin-waits), so use ``--clock wall`` on an
idle machine. Ours and theirs alternate within every repeat and the fastest repeat of
each is reported.

    python benchmarks/llm.py --quick [--json out.json] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# `python benchmarks/llm.py` puts benchmarks/ first on sys.path, where benchmarks/tokenizers.py
# would shadow Hugging Face's `tokenizers` package that transformers imports
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tessera.core.grammar import Grammar  # noqa: E402
from tessera.core.spec import ModalitySpec, TokenLayout  # noqa: E402
from tessera.core.vocab import UnifiedVocab  # noqa: E402
from tessera.llm.export import export_hf  # noqa: E402
from tessera.llm.generate import SamplingConfig, generate  # noqa: E402
from tessera.llm.model import LLMConfig, TesseraLM  # noqa: E402

GREEDY = SamplingConfig(temperature=0.0)


@dataclass(kw_only=True)
class BenchSettings:
    preset: str = "cpu-small"
    train_batch: int = 4
    train_seq: int = 256
    train_seq_bf16: int = 256  # CPUs without bf16 matmul units emulate it, ~30x slower
    train_steps: int = 3
    prompt_len: int = 16
    new_tokens: int = 64
    repeats: int = 5

    @classmethod
    def quick(cls) -> BenchSettings:
        return cls(train_batch=1, train_seq=128, train_seq_bf16=32, train_steps=1, new_tokens=32, repeats=3)


def bench_vocab() -> UnifiedVocab:
    """4000 text ids, a 16x16 image of 4096 codes, speech with 3 residual levels of 1024."""
    image = ModalitySpec(name="image", version="bench", media_kind="image", fingerprint="0" * 64,
                         layout=TokenLayout(kind="fixed", levels=(4096,), steps=256))
    speech = ModalitySpec(name="speech", version="bench", media_kind="audio", fingerprint="1" * 64,
                          layout=TokenLayout(kind="variable", levels=(1024, 1024, 1024), max_steps=500))
    return UnifiedVocab.build(4000, [image, speech])


CLOCK = time.process_time


def timed(fn: Callable[[], object]) -> float:
    t = CLOCK()
    fn()
    return CLOCK() - t


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest seconds of each fn; one warm-up call each, then the fns alternate per repeat."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: min(v) for k, v in times.items()}


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (256, 512, 1024), reps: int = 3) -> float:
    """FLOP/s of square matmuls, the best over sizes and repeats (the attainable peak)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        best = max(best, 2 * n**3 / max(min(timed(lambda a=a, b=b: a @ b) for _ in range(reps)), 1e-9))
    return best


def train_step_fn(model: torch.nn.Module, ids: torch.Tensor, bf16: bool, hf: bool) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    inputs, targets = ids[:, :-1], ids[:, 1:].flatten()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(inputs).logits if hf else model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


@torch.inference_mode()
def near_tie(ours: TesseraLM, theirs: torch.nn.Module, prompt: torch.Tensor, ours_tokens: torch.Tensor,
             hf_tokens: torch.Tensor, eos_id: int) -> str:
    """Where greedy outputs differ: HF's top-2 logit margin at the first differing step.
    A margin far below the float error of a different kernel order is a tie, not a bug."""
    row = int((ours_tokens != hf_tokens).any(1).nonzero()[0])
    step = int((ours_tokens[row] != hf_tokens[row]).nonzero()[0])
    context = torch.cat([prompt[row], hf_tokens[row, :step]])[None]
    hf_logits, ours_logits = theirs(context).logits[0, -1].float(), ours(context)[0, -1].float()
    gap = float((ours_logits - hf_logits).abs().max())
    hf_logits[eos_id] = float("-inf")  # HF runs with min_new_tokens, which bans <eos>
    top2 = hf_logits.topk(2).values
    return (f"tokens differ from step {step}: HF's top-2 margin there {float(top2[0] - top2[1]):.1e}, "
            f"max logit difference {gap:.1e}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--preset", default=None, help="LLMConfig preset (default cpu-small)")
    parser.add_argument("--only", default="train,generate,grammar",
                        help="comma-separated sections to run: train, generate, grammar")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time our training (Module.compile) and generation (compile=True: the decode step) "
                             "through torch.compile; needs a C++ compiler, tens of seconds to compile")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: process CPU time (robust on a shared machine); wall: wall-clock time")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    s = BenchSettings.quick() if args.quick else BenchSettings()
    if args.preset:
        s.preset = args.preset
    import transformers

    vocab = bench_vocab()
    torch.manual_seed(0)
    ours = TesseraLM(LLMConfig.preset(s.preset, vocab.size))
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, tmp, manifest=vocab.manifest(), sentencepiece_model=None)
        theirs = transformers.LlamaForCausalLM.from_pretrained(tmp, local_files_only=True,
                                                               attn_implementation="sdpa").float()
    results: dict = {"settings": asdict(s), "threads": args.threads, "clock": args.clock, "torch": torch.__version__,
                     "transformers": transformers.__version__, "params": ours.num_params()}
    rows: list[tuple[str, float, float | None, str]] = []  # metric, ours, theirs, target

    # 1. matmul peak and training
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    results["matmul_peak_gflops"] = {k: v / 1e9 for k, v in peak.items()}
    print(f"preset {s.preset}, {ours.num_params() / 1e6:.1f}M params, vocab {vocab.size}, {args.threads} "
          f"thread(s), {args.clock} clock, matmul peak fp32 {peak['fp32'] / 1e9:.1f} / bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s", flush=True)
    print(f"{'metric':<48}{'tessera':>10}{'HF':>10}{'ratio':>8}  target", flush=True)

    def row(metric: str, a: float, b: float | None, target: str) -> None:
        rows.append((metric, a, b, target))
        theirs_s, ratio = ("-", "") if b is None else (f"{b:.1f}", f"{a / b:.2f}x")
        print(f"{metric:<48}{a:10.1f}{theirs_s:>10}{ratio:>8}  {target}", flush=True)

    sections = set(args.only.split(","))
    for name, bf16, seq in (("fp32", False, s.train_seq), ("bf16", True, s.train_seq_bf16)):
        if "train" not in sections:
            break
        ids = torch.randint(0, vocab.size, (s.train_batch, seq + 1))
        tokens = s.train_batch * seq
        flops = ours.flops_per_token(seq)
        ours.train(), theirs.train()
        # train copies: the optimizer steps would make the two models differ before generation
        fns = {"ours": train_step_fn(copy.deepcopy(ours), ids, bf16, hf=False),
               "hf": train_step_fn(copy.deepcopy(theirs), ids, bf16, hf=True)}
        if args.compile:  # what `tessera train --compile` does: Module.compile in place
            compiled = copy.deepcopy(ours)
            compiled.compile()
            fns["ours_compiled"] = train_step_fn(compiled, ids, bf16, hf=False)
        secs = interleaved({k: (lambda f=f: [f() for _ in range(s.train_steps)]) for k, f in fns.items()},
                           s.repeats)
        tps = {k: tokens * s.train_steps / v for k, v in secs.items()}
        results[f"train_{name}"] = {k: {"tokens_per_s": v, "mfu": v * flops / peak[name]} for k, v in tps.items()}
        label = f"train {name} tokens/s (B={s.train_batch}, T={seq})"
        if args.compile:
            row(f"{label}, eager", tps["ours"], tps["hf"], "")
            row(f"{label}, compiled", tps["ours_compiled"], tps["hf"], ">= 1.1x")
        else:
            row(label, tps["ours"], tps["hf"], ">= 1.1x")
        best = max(tps["ours"], tps.get("ours_compiled", 0.0))
        row(f"train {name} MFU %", 100 * best * flops / peak[name], 100 * tps["hf"] * flops / peak[name], "")

    # 2. generation, greedy, equal lengths
    ours.eval(), theirs.eval()
    for batch, target in ((1, ">= 2x"), (8, ">= 1.5x")):
        if "generate" not in sections:
            break
        prompt = torch.randint(0, vocab.text_size, (batch, s.prompt_len))
        n = s.new_tokens

        def run_ours(prompt: torch.Tensor = prompt, n: int = n, compile: bool = False) -> torch.Tensor:
            return torch.stack(generate(ours, list(prompt), max_new_tokens=n, sampling=GREEDY, compile=compile))

        def run_hf(prompt: torch.Tensor = prompt, n: int = n) -> torch.Tensor:
            with torch.inference_mode():
                out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                      max_new_tokens=n, min_new_tokens=n, pad_token_id=vocab.pad_id,
                                      eos_token_id=vocab.eos_id)
            return out[:, prompt.shape[1]:]

        fns: dict[str, Callable[[], object]] = {"ours": run_ours, "hf": run_hf}
        if args.compile:  # the warm-up call of interleaved() compiles, outside the timing
            fns["ours_compiled"] = lambda prompt=prompt, n=n: run_ours(prompt, n, compile=True)
        hf_tokens = run_hf()
        same, notes = {}, {}
        for name in fns.keys() - {"hf"}:
            tokens = fns[name]()
            same[name] = torch.equal(tokens, hf_tokens)
            notes[name] = "" if same[name] else f" ({near_tie(ours, theirs, prompt, tokens, hf_tokens, vocab.eos_id)})"
        secs = interleaved(fns, s.repeats)
        tps = {k: batch * n / v for k, v in secs.items()}
        results[f"generate_b{batch}"] = {"tokens_per_s": tps, "same_tokens": same,
                                         "note": {k: v.strip(" ()") for k, v in notes.items()}}
        if args.compile:
            row(f"generate b{batch} tokens/s, eager{notes['ours']}", tps["ours"], tps["hf"], "")
            row(f"generate b{batch} tokens/s, compiled{notes['ours_compiled']}", tps["ours_compiled"], tps["hf"],
                target)
        else:
            row(f"generate b{batch} tokens/s{notes['ours']}", tps["ours"], tps["hf"], target)

    # 3. grammar-constrained vs unconstrained decoding (inside an image span)
    grammar = Grammar.from_manifest(vocab.manifest())
    for batch in (1, 8):
        if "grammar" not in sections:
            break
        prompt = torch.tensor([vocab.bos_id, 5, 6, vocab.begin_id("image")]).repeat(batch, 1)
        n = s.new_tokens
        secs = interleaved({
            "plain": lambda p=prompt, n=n: generate(ours, list(p), max_new_tokens=n, sampling=GREEDY),
            "grammar": lambda p=prompt, n=n: generate(ours, list(p), max_new_tokens=n, sampling=GREEDY,
                                                      grammar=grammar, pad_id=vocab.pad_id),
        }, s.repeats)
        overhead = secs["grammar"] / secs["plain"] - 1
        results[f"grammar_b{batch}"] = {"seconds": secs, "overhead": overhead}
        row(f"grammar overhead b{batch} %", 100 * overhead, None, "<= 5%")

    results["table"] = [dict(zip(("metric", "tessera", "hf", "target"), r, strict=True)) for r in rows]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
