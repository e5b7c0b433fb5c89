"""``tessera eval BUNDLE``: score a bundle on the built-in world's held-out scenes.

Held-out scenes are the corpus's seeds ``[0, heldout)``, never trained on (:mod:`.corpus`).
Samples are generated with the bundle's task pipelines (its default sampling, guidance
and ``best_of`` reranking, recorded in the output's ``settings``) in batches of
``batch_size``, each batch seeded by its first sample's index, and scored against their
ground truth:

* **text→image / text→video attribute accuracy**: the generated media is read back by the
  visual world's checker (:mod:`tessera.modalities.world.checker`, no learned model) and
  compared with the scene: the fraction of (object, attribute) pairs right — shape,
  colour, size, position; for clips also motion, direction and end colour;
  Read objects are matched to the scene's in the order that agrees best, so extra blobs
  can only add chance matches; **strict attribute accuracy** counts each extra object as a
  wrong one (the accuracy × expected / max(expected, read) objects) — the figure to watch
  when guidance or temperature paint clutter;
* **image→text / video→text attribute accuracy**: the generated caption is split into one
  clause per object and each expected attribute's words are looked for in its clause
  (objects matched to clauses in the order that agrees best), plus the exact-match rate of
  whole captions;
* **speech→text word accuracy**: ``1 - WER`` of the transcript of the held-out spoken
  caption (eSpeak NG voices, rates and pitches), floored at 0;
* **text→speech→text round trip**: the caption spoken by the bundle, transcribed by the
  bundle, word accuracy against the caption.

Every attribute-scored task also reports ``by_attribute``: the accuracy of each attribute
on its own (for generated media also the object ``count`` and the ``background``), which
says what a bundle still gets wrong. Tasks whose modality the bundle lacks are skipped; a task that fails (e.g. a tokenizer that
refuses codes its own spec allows) is reported with its error. Output: JSON (``--json PATH`` too).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.checkpoint import save_json
from .bundle import DEFAULT_BUNDLE, Bundle

__all__ = ["evaluate", "word_accuracy", "caption_attribute_accuracy", "media_attribute_accuracy", "main", "TASKS"]

TASKS = ("text-to-image", "text-to-video", "image-to-text", "video-to-text", "speech-to-text", "text-speech-text")
_BACKGROUND = re.compile(r",? on an? \w+ background|an? \w+ background with |;? the background is \w+")


def word_accuracy(hypothesis: str, reference: str) -> float:
    """``max(0, 1 - WER)``: word-level Levenshtein distance over the reference length,
    case and punctuation ignored."""
    hyp = re.findall(r"[a-z0-9'-]+", hypothesis.lower())
    ref = re.findall(r"[a-z0-9'-]+", reference.lower())
    if not ref:
        raise ValueError("the reference has no words; word accuracy needs a non-empty reference")
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return max(0.0, 1.0 - row[-1] / len(ref))


def _expected_words(obj: Any) -> dict[str, str]:
    """The words a caption uses for each attribute of a scene object (see visual.py's captions)."""
    from ..modalities.world.visual import _DIRECTION_PHRASE, _WHERE

    words = {"shape": obj.shape, "colour": obj.colour}
    motion = getattr(obj, "motion", None)
    if motion is None:
        return {**words, "size": obj.size, "position": _WHERE[obj.position]}
    words["motion"] = {"moving": "moving", "bouncing": "bouncing", "growing": "growing"}.get(motion, "changing")
    if motion == "moving":
        words["direction"] = _DIRECTION_PHRASE[obj.direction]
    if motion != "growing":
        words["size"] = obj.size
    if motion in ("growing", "colour-change"):
        words["position"] = _WHERE[obj.position]
    if motion == "colour-change":
        words["end_colour"] = f"to {obj.end_colour}"
        words["colour"] = f"from {obj.colour}"
    return words


def caption_attribute_accuracy(caption: str, scene: Any) -> dict[str, Any]:
    """Fraction of the scene's (object, attribute) pairs a generated caption gets right,
    ``background`` (named right), ``exact`` (every attribute, the right number of objects)
    and ``by_attribute`` (per attribute name, the fraction of objects it is right for)."""
    text = caption.lower()
    background = float(re.search(rf"\b{scene.background}\b background|background is {scene.background}\b", text) is not None)
    clauses = [c.strip() for c in _BACKGROUND.sub(" ", text).split(" and ") if c.strip()]
    expected = [_expected_words(o) for o in scene.attributes]
    total = sum(len(e) for e in expected)
    names = list(dict.fromkeys(k for e in expected for k in e))
    best: dict[str, int] = dict.fromkeys(names, 0)
    m = min(len(clauses), len(expected))  # objects matched to distinct clauses; the rest score nothing
    for objects in itertools.combinations(range(len(expected)), m):
        for perm in itertools.permutations(range(len(clauses)), m):
            hits = dict.fromkeys(names, 0)
            for i, j in zip(objects, perm, strict=True):
                for k, w in expected[i].items():
                    hits[k] += re.search(rf"\b{re.escape(w)}\b", clauses[j]) is not None
            if sum(hits.values()) > sum(best.values()):
                best = hits
    right = sum(best.values())
    by_attribute = {k: best[k] / sum(k in e for e in expected) for k in names}
    return {"attributes": right / total, "background": background,
            "exact": float(right == total and len(clauses) == len(expected) and background == 1.0),
            "by_attribute": by_attribute}


def media_attribute_accuracy(media: Any, scene: Any) -> dict[str, Any]:
    """Score generated media (an image, or a clip for a video scene) against its scene with
    the visual checker: ``attribute_accuracy`` (mean over the attributes of the fraction of
    objects right), ``strict_attribute_accuracy`` (the same × expected / max(expected, read)
    objects: extras count as wrong), ``all`` and ``by_attribute`` (with ``count`` and
    ``background``)."""
    from ..modalities.world.checker import IMAGE_ATTRIBUTES, VIDEO_ATTRIBUTES, check_image, check_video
    from ..modalities.world.visual import VideoScene

    check, names = (check_video, VIDEO_ATTRIBUTES) if isinstance(scene, VideoScene) else (check_image, IMAGE_ATTRIBUTES)
    scores = check(media, scene)
    read, expected = scores.pop("objects"), len(scene.attributes)
    accuracy = _attribute_mean(scores, names)
    return {"attribute_accuracy": accuracy, "strict_attribute_accuracy": accuracy * expected / max(expected, read),
            "all": scores["all"], "by_attribute": {k: v for k, v in scores.items() if k != "all"}}


def _mean(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each score over the rows; ``by_attribute`` dicts are averaged per attribute
    over the rows that have it (a clip's attributes depend on its motion). A mean over
    scenes, not objects. For media→text an attribute counts only objects that have it;
    the text→video checker scores ``direction``/``end_colour`` of every object (a still one
    is right when the clip shows none), so those two read higher there."""
    out: dict[str, Any] = {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in rows[0] if k != "by_attribute"}
    if any("by_attribute" in r for r in rows):
        per: dict[str, list[float]] = {}
        for r in rows:
            for k, v in r.get("by_attribute", {}).items():
                per.setdefault(k, []).append(v)
        out["by_attribute"] = {k: round(sum(v) / len(v), 4) for k, v in per.items()}
    return out


def _attribute_mean(scores: dict[str, float], names: Sequence[str]) -> float:
    present = [scores[k] for k in names if k in scores]
    return sum(present) / len(present)


def _score_batch(bundle: Bundle, task: str, needs: str, idx: list[int], visual: dict[str, Any]) -> list[dict[str, float]]:
    """Scores of held-out samples ``idx``, generated as one batch with seed ``idx[0]``."""
    from ..modalities.speech.synth import caption_for_seed
    from .tasks import MediaToTextPipeline, TextToMediaPipeline

    seed = idx[0]
    if task in ("text-to-image", "text-to-video"):
        scenes = [visual[needs](i) for i in idx]
        media = TextToMediaPipeline(bundle, needs)([s.caption for s in scenes], seed=seed)
        return [media_attribute_accuracy(m, s) for m, s in zip(media, scenes, strict=True)]
    if task in ("image-to-text", "video-to-text"):
        scenes = [visual[needs](i) for i in idx]
        captions = MediaToTextPipeline(bundle, needs)([bundle.tokenizers[needs].example(i) for i in idx], seed=seed)
        scores = [caption_attribute_accuracy(c, s) for c, s in zip(captions, scenes, strict=True)]
        return [{"attribute_accuracy": sc["attributes"], "background": sc["background"], "exact_match": sc["exact"],
                 "by_attribute": sc["by_attribute"]} for sc in scores]
    references = [caption_for_seed(i) for i in idx]
    if task == "speech-to-text":
        audio = [bundle.tokenizers["speech"].example(i) for i in idx]
    else:  # text-speech-text: the caption spoken by the bundle, then transcribed by it
        audio = TextToMediaPipeline(bundle, "speech")(references, seed=seed)
    heard = MediaToTextPipeline(bundle, "speech")(audio, seed=seed)
    return [{"word_accuracy": word_accuracy(h, r)} for h, r in zip(heard, references, strict=True)]


def evaluate(bundle: Bundle, *, n: int = 50, heldout: int = 1000, tasks: Sequence[str] = TASKS,
             progress: bool = True, batch_size: int = 8) -> dict[str, Any]:
    """Score ``bundle`` on ``n`` held-out scenes per task (see the module docstring),
    ``batch_size`` samples per generation call."""
    from tqdm import tqdm

    from ..modalities.world.visual import sample_image_scene, sample_video_scene

    if not 1 <= n <= heldout:
        raise ValueError(f"n={n}: evaluate on 1..{heldout} held-out scenes")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1 (e.g. 8)")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown eval tasks {unknown}; choose from {TASKS}")
    has = set(bundle.tokenizers)
    results: dict[str, Any] = {"n": n, "bundle": str(bundle.path), "skipped": [],
                               "settings": {k: bundle.settings.get(k) for k in ("sampling", "cfg_scale", "best_of")}}
    visual = {"image": sample_image_scene, "video": sample_video_scene}
    for task in tasks:
        needs = {"text-speech-text": "speech"}.get(task) or next(m for m in task.split("-") if m != "text" and m != "to")
        if needs not in has:
            results["skipped"].append(task)
            continue
        t0 = time.perf_counter()
        rows: list[dict[str, float]] = []
        try:
            with tqdm(total=n, desc=task, disable=not progress) as bar:
                for start in range(0, n, batch_size):
                    idx = list(range(start, min(n, start + batch_size)))
                    rows += _score_batch(bundle, task, needs, idx, visual)
                    bar.update(len(idx))
        except ValueError as e:  # e.g. a tokenizer that cannot decode what its own spec allows
            results[task] = {"error": str(e), "scored": len(rows)}
            continue
        results[task] = {**_mean(rows), "seconds": round(time.perf_counter() - t0, 1)}
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tessera eval", description="Score a bundle on the built-in world's held-out scenes.",
        epilog="examples:\n  tessera eval\n  tessera eval my_bundle --n 20 --tasks text-to-image image-to-text "
               "--json eval.json", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", default=str(DEFAULT_BUNDLE), help="bundle folder (default: the default bundle)")
    p.add_argument("--n", type=int, default=50, help="held-out samples per task")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--batch-size", type=int, default=8,
                   help="samples generated together (faster; each batch is seeded by its first sample's index)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile (about a minute to compile, then 1.3-2x faster generation)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .bundle import load_bundle

    args = _parser().parse_args(argv)
    try:
        results = evaluate(load_bundle(args.bundle, compile=args.compile), n=args.n, tasks=args.tasks, progress=args.progress,
                           batch_size=args.batch_size)
    except ValueError as e:
        print(f"tessera eval: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        save_json(Path(args.json), results)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
