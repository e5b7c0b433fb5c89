"""``tessera build-default``: train everything the default bundle needs on the built-in world.

Stages (each timed, with progress bars; finished stages are reused when the command is
run again with the same work folder):

1. the text tokenizer: sentencepiece (BPE) on the training scenes' captions and the
   instruction templates;
2. the image, video and speech tokenizers: the checkpoints shipped in
   ``modalities/*/weights/`` (``--quick`` falls back to the untrained ``debug()`` ones
   when a checkpoint is missing; a full build asks you to train it first);
3. the corpus (:mod:`.corpus`): training documents and the held-out split as token shards;
4. the LLM through DeepSpeed (:mod:`tessera.llm.train`, preset ``cpu-small``, one process);
5. the bundle, bf16 safetensors, checked to fit the 50 MB budget, written to ``--out``.

    tessera build-default                    # the committed default bundle
    tessera build-default --quick --out /tmp/quick_bundle   # every stage at tiny sizes: ~2 min

How long (measured on 2 idle cores for the committed bundle): the corpus (9000 training and
300 held-out documents: scenes rendered, clips spoken by eSpeak NG, all encoded) 9 min; the
LLM (cpu-small, 7.3M parameters, 900 steps of 4 rows x 1024 tokens, fp32) ~3.5-4.3 s a step,
about an hour; the rest seconds. On a machine shared with other jobs it is several times
slower. The LLM is still undertrained at this budget (see the README's status): a longer
run is ``--max-steps N``: a rerun with the same work folder reuses the corpus and resumes
the LLM from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.checkpoint import save_json
from .bundle import DEFAULT_BUNDLE, Bundle

if TYPE_CHECKING:
    from .corpus import CorpusConfig

__all__ = ["BuildConfig", "build", "main", "SIZE_BUDGET_MB"]

SIZE_BUDGET_MB = 50.0
_BUILTIN = ("image", "video", "speech")


@dataclass(kw_only=True)
class BuildConfig:
    """Sizes of one build (JSON-serialisable); :meth:`quick` is the smoke-test preset."""

    out: str = str(DEFAULT_BUNDLE)
    work_dir: str = "runs/build-default"
    modalities: tuple[str, ...] = _BUILTIN
    text_vocab: int = 640  # the built-in captions use ~100 words: BPE runs out of merges near 780
    text_scenes: int = 4000  # training scenes whose captions train the text tokenizer
    train_docs: int = 9000
    heldout_docs: int = 300
    # the corpus mix: the figures the bundle must reach are text->image, image->text and
    # speech->text, so images and transcription get most of the (CPU-bound) token budget
    modality_mix: dict[str, float] = field(default_factory=lambda: {"image": 0.5, "video": 0.1, "speech": 0.4})
    task_mix: dict[str, dict[str, float]] = field(default_factory=lambda: {
        "image": {"text-to-media": 0.5, "media-to-text": 0.4, "interleaved": 0.1},
        "speech": {"text-to-media": 0.25, "media-to-text": 0.65, "interleaved": 0.1}})
    model: str = "cpu-small"
    max_seq_len: int = 1024  # the LLM's context (overrides the preset's): room for a spoken caption
    seq_len: int = 1024  # training rows
    micro_batch: int = 4  # 4 rows x 1024 tokens per step: ~4 s on 2 idle cores (cpu-small, fp32)
    grad_accum: int = 1
    max_steps: int = 900
    lr: float = 2e-3
    warmup_steps: int = 50
    precision: str = "fp32"
    save_every: int = 150
    seed: int = 0
    quick: bool = False  # allow untrained debug tokenizers when a shipped checkpoint is missing

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        for name in ("text_vocab", "text_scenes", "train_docs", "heldout_docs", "max_steps", "seq_len", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"BuildConfig.{name}={getattr(self, name)} must be >= 1")
        missing = sorted(set(self.modalities) - set(self.modality_mix))
        if missing:
            raise ValueError(f"BuildConfig.modality_mix={self.modality_mix} has no weight for {missing}; give every "
                             f"modality of the build a weight")
        self.corpus_config()  # the mixes are checked now, not an hour into the build

    def corpus_config(self) -> CorpusConfig:
        """The :class:`~.corpus.CorpusConfig` of this build's training documents."""
        from .corpus import CorpusConfig

        return CorpusConfig(seed=self.seed, modality_mix=self.modality_mix, task_mix=self.task_mix)

    @classmethod
    def debug(cls, **overrides: Any) -> BuildConfig:
        """Seconds to minutes: the debug LLM, a few hundred documents, a few dozen steps."""
        base = dict(text_vocab=512, text_scenes=300, train_docs=240, heldout_docs=24, model="debug", seq_len=256,
                    micro_batch=4, grad_accum=1, max_steps=30, lr=3e-3, warmup_steps=3, save_every=0, quick=True)
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modalities"] = list(self.modalities)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown BuildConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


def _tokenizers(config: BuildConfig, log: list[str]) -> dict[str, Any]:
    """The shipped checkpoints, or (``quick``) the untrained debug tokenizers."""
    from ..core.registry import get_modality

    out = {}
    for name in config.modalities:
        cls = get_modality(name)
        try:
            out[name] = cls.pretrained()
            log.append(f"{name}: shipped checkpoint")
        except (FileNotFoundError, ValueError) as e:
            if not config.quick:
                raise ValueError(f"{e}; the default bundle reuses the shipped {name} tokenizer: train it first "
                                 f"(`tessera tokenizer train {name} --out runs/{name}`) and copy it to its weights/ "
                                 f"folder, or run with --quick") from e
            out[name] = cls.debug()
            log.append(f"{name}: no shipped checkpoint, untrained debug tokenizer (--quick)")
    return out


def build(config: BuildConfig, *, progress: bool = True) -> tuple[Bundle, dict[str, Any]]:
    """Run every stage; returns the trained bundle (saved to ``config.out``) and a report
    of timings (seconds per stage), sizes and the final losses."""
    from ..core.text import TextTokenizer
    from ..llm.data import INDEX_NAME
    from ..llm.model import LLMConfig, TesseraLM
    from ..llm.train import TrainConfig, train
    from .bundle import create_bundle, save_bundle
    from .corpus import corpus_texts, tokenize_corpus
    from .tasks import instruction_texts

    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    save_json(work / "build_config.json", config.to_dict())
    timings: dict[str, float] = {}
    notes: list[str] = []

    def stage(name: str) -> None:
        timings[name] = round(time.perf_counter() - clock[0], 1)
        clock[0] = time.perf_counter()
        if progress:
            print(f"[build-default] {name}: {timings[name]} s", flush=True)

    clock = [time.perf_counter()]
    # 1. tokenizers: the modality ones first (their templates go into the text tokenizer's corpus)
    tokenizers = _tokenizers(config, notes)
    stage("modality tokenizers")
    text_file = work / "text.model"
    if text_file.is_file():
        text = TextTokenizer.load(text_file)
    else:
        sentences = corpus_texts(config.text_scenes) + instruction_texts(tokenizers) * 50
        text = TextTokenizer.train(sentences, vocab_size=config.text_vocab, out=text_file)
    stage("text tokenizer")

    # 2. the untrained bundle, and the corpus as token shards
    llm_config = LLMConfig.preset(config.model, vocab_size=1)  # create_bundle sets the vocabulary size
    llm_config.max_seq_len = config.max_seq_len
    bundle = create_bundle(text, tokenizers, model_config=llm_config, seed=config.seed)
    bundle.model.save_pretrained(work / "init", manifest_hash=bundle.vocab.manifest_hash, manifest=bundle.vocab.manifest())
    corpus = config.corpus_config()
    data = {}
    for split, n in (("train", config.train_docs), ("heldout", config.heldout_docs)):
        folder = work / "data" / f"{split}-{bundle.vocab.manifest_hash[:12]}"
        if not (folder / INDEX_NAME).is_file():
            tokenize_corpus(bundle, n, folder, split=split, config=corpus, progress=progress)
        data[split] = folder
    stage("corpus")

    # 3. the LLM through DeepSpeed
    tc = TrainConfig(data=str(data["train"]), out_dir=str(work / "llm"), init_from=str(work / "init"),
                     eval_data=str(data["heldout"]), seq_len=config.seq_len, micro_batch=config.micro_batch,
                     grad_accum=config.grad_accum, max_steps=config.max_steps, lr=config.lr,
                     min_lr=config.lr / 10, warmup_steps=config.warmup_steps, precision=config.precision,
                     save_every=config.save_every, eval_every=config.save_every, seed=config.seed,
                     progress=progress)
    result = train(tc)
    stage("llm training")

    # 4. the bundle
    bundle.model = TesseraLM.from_pretrained(result["model_dir"], expected_manifest=bundle.vocab.manifest()).eval()
    save_bundle(bundle, config.out)
    size_mb = sum(p.stat().st_size for p in Path(config.out).rglob("*") if p.is_file()) / 2**20
    if size_mb > SIZE_BUDGET_MB:
        raise ValueError(f"the bundle at {config.out} is {size_mb:.1f} MB, over the {SIZE_BUDGET_MB:.0f} MB budget; "
                         f"use a smaller model preset or smaller tokenizers")
    stage("bundle")
    report = {"timings_s": timings, "total_s": round(sum(timings.values()), 1), "bundle_mb": round(size_mb, 2),
              "final_loss": result["final_loss"], "eval_loss": result["eval_loss"], "tokens": result["tokens"],
              "steps": result["steps"], "llm_params": bundle.model.num_params(), "notes": notes,
              "config": config.to_dict()}
    save_json(work / "build_report.json", report)
    return bundle, report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tessera build-default",
        description="Train the default bundle on the built-in world (text, image, video and speech tokenizers, "
                    "the corpus, the LLM through DeepSpeed) and write it as bf16 safetensors.",
        epilog="examples:\n  tessera build-default\n  tessera build-default --quick --out /tmp/quick_bundle",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help=f"bundle folder (default {DEFAULT_BUNDLE})")
    p.add_argument("--work-dir", dest="work_dir", help="intermediate files, reused by a rerun (default runs/build-default)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and the debug LLM: every stage in minutes")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="LLM optimizer steps")
    p.add_argument("--train-docs", dest="train_docs", type=int, help="training documents")
    p.add_argument("--model", help="LLM preset (debug, cpu-small, ...)")
    p.add_argument("--modalities", nargs="+", help=f"modalities of the bundle (default: {' '.join(_BUILTIN)})")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    progress = args.pop("progress")
    quick = args.pop("quick")
    overrides = {k: v for k, v in args.items() if v is not None}
    try:
        config = BuildConfig.debug(**overrides) if quick else BuildConfig(**overrides)
        _, report = build(config, progress=progress)
    except ValueError as e:
        print(f"tessera build-default: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("timings_s", "total_s", "bundle_mb", "final_loss", "eval_loss", "notes")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
