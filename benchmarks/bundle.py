"""The default bundle's task figures against a retrieval peer, on the built-in world's
held-out scenes; prints a table (tessera / peer) and JSON rows.

tessera: ``tessera eval`` (:func:`tessera.pipelines.evaluate.evaluate`) with the bundle's
own settings (sampling, guidance, best-of reranking) — text→image attribute accuracy (and
its strict form, extra objects counted wrong), image→text attribute accuracy, speech→text
word accuracy, each on scenes ``0..n-1``.

The peer generates nothing: it answers each held-out query with the nearest of ``R``
training scenes (seeds from 1000 up, the range the corpus trains on), seen through the
bundle's own tokenizers —

* image→text: the caption of the training image whose 256 image ids agree with the
  query's at the most grid cells;
* text→image: the training image (tokenized and decoded, as the LLM's would be) whose
  caption shares the most words with the query (Jaccard over word sets);
* speech→text: the transcript of the training utterance whose bag of speech ids is the
  most similar (cosine over id counts).

It is what memorising the training set without generalising would score; the ratio says
how much the LLM adds. The ``checks`` row holds the issue's targets (text→image ≥ 80 %,
image→text ≥ 90 %, speech→text ≥ 80 %).

    python benchmarks/bundle.py --quick --json out/bundle.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

import torch

HELD_OUT = {True: 24, False: 100}
REFERENCES = {True: 400, False: 2000}  # training images for the peer (speech: a quarter)
FIRST_TRAIN_SEED = 1000  # the corpus holds out scenes [0, 1000)
TARGETS = {"text-to-image": 0.80, "image-to-text": 0.90, "speech-to-text": 0.80}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z-]+", text.lower()))


def _peer(bundle: Any, n: int, refs: int) -> dict[str, Any]:
    from tessera.modalities.speech.synth import caption_for_seed
    from tessera.modalities.world.visual import sample_image_scene
    from tessera.pipelines.evaluate import caption_attribute_accuracy, media_attribute_accuracy, word_accuracy

    image, speech = bundle.tokenizers["image"], bundle.tokenizers["speech"]
    seeds = range(FIRST_TRAIN_SEED, FIRST_TRAIN_SEED + refs)
    t0 = time.perf_counter()
    ref_ids = torch.cat([image.encode_batch(torch.stack([image.example(s) for s in seeds[i : i + 64]]))
                         for i in range(0, refs, 64)])
    ref_captions = [sample_image_scene(s).caption for s in seeds]
    ref_words = [_words(c) for c in ref_captions]
    out: dict[str, Any] = {}

    rows = []  # image -> text: most grid cells equal
    query = image.encode_batch(torch.stack([image.example(i) for i in range(n)]))
    for i in range(n):
        j = int((ref_ids == query[i]).sum(1).argmax())
        rows.append(caption_attribute_accuracy(ref_captions[j], sample_image_scene(i))["attributes"])
    out["image-to-text"] = sum(rows) / n

    plain, strict = [], []  # text -> image: most caption words shared
    for i in range(n):
        scene = sample_image_scene(i)
        words = _words(scene.caption)
        j = max(range(refs), key=lambda k: len(words & ref_words[k]) / len(words | ref_words[k]))
        score = media_attribute_accuracy(image.decode(ref_ids[j]), scene)
        plain.append(score["attribute_accuracy"])
        strict.append(score["strict_attribute_accuracy"])
    out["text-to-image"], out["text-to-image strict"] = sum(plain) / n, sum(strict) / n

    def bag(ids: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(ids, minlength=speech.spec.layout.local_size).float()
        return counts / counts.norm()

    speech_seeds = seeds[: max(1, refs // 4)]
    ref_bags = torch.stack([bag(speech.encode(speech.example(s))) for s in speech_seeds])
    rows = []  # speech -> text: most similar bag of ids
    for i in range(n):
        j = int((ref_bags @ bag(speech.encode(speech.example(i)))).argmax())
        rows.append(word_accuracy(caption_for_seed(speech_seeds[j]), caption_for_seed(i)))
    out["speech-to-text"] = sum(rows) / n
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def run(bundle_path: str | None, quick: bool) -> list[dict[str, Any]]:
    from tessera.pipelines.bundle import DEFAULT_BUNDLE, load_bundle
    from tessera.pipelines.evaluate import evaluate

    bundle = load_bundle(bundle_path or DEFAULT_BUNDLE)
    missing = sorted({"image", "speech"} - set(bundle.tokenizers))
    if missing:
        raise SystemExit(f"benchmarks/bundle.py: the bundle has no {missing} tokenizer; give a bundle with image and speech")
    n, refs = HELD_OUT[quick], REFERENCES[quick]
    t0 = time.perf_counter()
    ours = evaluate(bundle, n=n, tasks=list(TARGETS), progress=False)
    seconds = round(time.perf_counter() - t0, 1)
    peer = _peer(bundle, n, refs)
    figures = {
        "text-to-image": ours["text-to-image"]["attribute_accuracy"],
        "text-to-image strict": ours["text-to-image"]["strict_attribute_accuracy"],
        "image-to-text": ours["image-to-text"]["attribute_accuracy"],
        "speech-to-text": ours["speech-to-text"]["word_accuracy"],
    }
    rows: list[dict[str, Any]] = []
    for task, value in figures.items():
        rows.append({"task": task, "tessera": round(value, 4), "peer": round(peer[task], 4),
                     "ratio": round(value / peer[task], 3) if peer[task] else None,
                     "target": TARGETS.get(task), "held_out": n,
                     **({"by_attribute": ours[task]["by_attribute"]} if task in ours and "by_attribute" in ours[task] else {})})
    checks: dict[str, Any] = {"checks": True, **{f"{t} >= {v:.0%}": figures[t] >= v for t, v in TARGETS.items()},
                              "settings": ours["settings"], "tessera_seconds": seconds, "peer_seconds": peer["seconds"],
                              "peer": f"nearest of {refs} training scenes ({max(1, refs // 4)} utterances)"}
    if quick:
        checks["note"] = f"--quick scores {n} held-out scenes: expect a few points of noise; the figures are quoted at 100"
    return [*rows, checks]


def _print(rows: list[dict[str, Any]]) -> None:
    checks = rows[-1]
    print(f"{'task (' + str(rows[0]['held_out']) + ' held-out scenes)':<34}{'tessera':>9}{'peer':>9}{'ratio':>8}{'target':>8}")
    for r in rows[:-1]:
        target = f"{r['target']:.0%}" if r["target"] else ""
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        print(f"{r['task']:<34}{r['tessera']:9.1%}{r['peer']:9.1%}{ratio:>8}{target:>8}")
    print(f"peer: {checks['peer']}; {checks['tessera_seconds']} s tessera, {checks['peer_seconds']} s peer")
    for key, ok in checks.items():
        if isinstance(ok, bool) and key != "checks":
            print(f"  [{'ok' if ok else 'MISS'}] {key}")
    if "note" in checks:
        print(f"  note: {checks['note']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"{HELD_OUT[True]} held-out scenes and {REFERENCES[True]} references (a few minutes) "
                        f"instead of {HELD_OUT[False]} and {REFERENCES[False]}")
    p.add_argument("--bundle", help="bundle folder (default: the committed default bundle)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.bundle, args.quick)
    _print(rows)
    for row in rows:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
