"""The ``tessera`` command: one entry point, subcommands mapped to typed functions (as in litgpt).

The CLI only parses and calls: every subcommand is a function over
:mod:`tessera.pipelines`, :mod:`tessera.llm` or a modality plugin, imported when the
subcommand runs, so ``tessera --help`` stays fast (no torch, no gradio).

Commands with their own argument parser are forwarded whole:

* ``tessera train ...``          → :func:`tessera.llm.train.main`
* ``tessera tokenize ...``       → :func:`tessera.pipelines.tokenize.main`
* ``tessera build-default ...``  → :func:`tessera.pipelines.build_default.main`
* ``tessera eval ...``           → :func:`tessera.pipelines.evaluate.main`
* ``tessera tokenizer VERB MODALITY ...`` → ``tessera.modalities.<name>.cli.main([VERB, ...])``

A user's mistake (a ``ValueError``, a missing file) prints ``tessera: error: ...`` and
exits with status 2, without a stack trace.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "modality_for_file", "FORWARDED"]

EXAMPLES = """examples:
  tessera demo                                   # the Gradio app on the default bundle
  tessera generate text-to-image "a red circle on the left" --out red.png
  tessera generate image-to-text red.png
  tessera chat -m "Describe this image." --file red.png
  tessera bundle info
  tessera tokenize data/docs.jsonl --out shards/
  tessera train --data shards/ --init-from pipelines/default_bundle --out runs/ft --lora-r 8
  tessera tokenizer train image --data builtin --out runs/image
  tessera export hf BUNDLE --out hf_model/
  tessera build-default --quick --out /tmp/bundle
  tessera eval --n 20

Run `tessera COMMAND --help` for the options of one command.
"""

# name → (module, help line); these commands parse their own arguments.
FORWARDED: dict[str, tuple[str, str]] = {
    "train": ("tessera.llm.train", "train or fine-tune the LLM through DeepSpeed (token shards → model)"),
    "tokenize": ("tessera.pipelines.tokenize", "turn your JSONL documents or .tar shards into token shards"),
    "build-default": ("tessera.pipelines.build_default", "train every part of the default bundle on the built-in world"),
    "eval": ("tessera.pipelines.evaluate", "score a bundle on the built-in world's held-out scenes"),
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks."""


# ---- helpers ----------------------------------------------------------------------------
def _bundle_path(path: str | None) -> Path:
    from tessera.pipelines.bundle import DEFAULT_BUNDLE

    folder = Path(path) if path else DEFAULT_BUNDLE
    if not (folder / "manifest.json").is_file():
        hint = ("the default bundle has not been built yet: run `tessera build-default` (or "
                "`tessera build-default --quick` for a small one in minutes)") if not path else \
            "give the folder of a bundle (it holds manifest.json, text.model, tokenizers/ and llm/)"
        raise ValueError(f"{folder} is not a Tessera bundle (no manifest.json); {hint}")
    return folder


def _sampling(bundle: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    """The bundle's sampling settings with --temperature / --top-k applied to text and every modality."""
    if args.temperature is None and args.top_k is None:
        return None
    from tessera.llm.generate import SamplingConfig

    given = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k)) if v is not None}
    return {k: SamplingConfig.from_dict({**v.to_dict(), **given}) for k, v in bundle.sampling().items()}


def _media_path(plugin: Any, out: str | None, default_stem: str, index: int | None) -> Path:
    """Where to write one generated media item: ``out`` (a file, or a folder for a batch)."""
    ext = plugin.file_extensions[0]
    if out is None:
        name = default_stem if index is None else f"{default_stem}-{index}"
        return Path(f"{name}{ext}")
    path = Path(out)
    if index is not None:
        return path / f"{default_stem}-{index}{ext}"
    if path.suffix.lower() not in plugin.file_extensions:
        raise ValueError(f"--out {out}: the {plugin.spec.name} tokenizer writes {', '.join(plugin.file_extensions)}; "
                         f"end the file name with one of them")
    return path


def modality_for_file(bundle: Any, path: str) -> str:
    """The first modality (in vocabulary order) whose tokenizer reads this file's extension
    (also how the app routes chat attachments)."""
    suffix = Path(path).suffix.lower()
    for name, plugin in bundle.tokenizers.items():
        if suffix in plugin.file_extensions:
            return name
    readable = sorted({e for p in bundle.tokenizers.values() for e in p.file_extensions})
    raise ValueError(f"{Path(path).name}: no tokenizer of this bundle reads {suffix or 'files without an extension'}"
                     f" files; give one of {', '.join(readable)}")


# ---- commands ---------------------------------------------------------------------------
def cmd_tokenizer(args: argparse.Namespace) -> int:
    from tessera.core.registry import get_modality

    cls = get_modality(args.modality)
    package = cls.__module__.rsplit(".", 1)[0] if cls.__module__.count(".") > 2 else cls.__module__
    try:
        module = importlib.import_module(f"{package}.cli")
    except ModuleNotFoundError as e:
        if e.name not in (package, f"{package}.cli"):
            raise
        raise ValueError(f"the {args.modality!r} plugin ({package}) has no command-line tools; "
                         f"train it with its own recipe") from e
    return int(module.main([args.verb, *args.rest]) or 0)


def cmd_demo(args: argparse.Namespace) -> int:
    from tessera.apps.app import AppLimits, launch

    limits = AppLimits(max_upload_mb=args.max_upload_mb, max_seconds=args.max_seconds,
                       max_new_tokens=args.max_new_tokens, max_best_of=args.max_best_of,
                       queue_size=args.queue_size)
    launch(args.bundle, host=args.host, port=args.port, limits=limits, compile=args.compile)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tessera.pipelines.bundle import load_bundle
    from tessera.pipelines.tasks import MediaToTextPipeline, tasks_for

    bundle = load_bundle(_bundle_path(args.bundle), compile=args.compile)
    tasks = tasks_for(bundle)
    if args.task not in tasks or args.task == "chat":
        names = [t for t in tasks if t != "chat"]
        raise ValueError(f"task {args.task!r} is not one of this bundle's tasks {names}; pick one "
                         f"(for a conversation use `tessera chat`)")
    pipe = tasks[args.task]
    inputs: Any = args.inputs[0] if len(args.inputs) == 1 else list(args.inputs)
    extra: dict[str, Any] = {}
    if args.best_of is not None:
        if isinstance(pipe, MediaToTextPipeline):
            raise ValueError(f"--best-of {args.best_of} reranks generated media; {args.task} writes text. Drop "
                             f"--best-of, or use it with a text-to-MODALITY task")
        extra["best_of"] = args.best_of
    result = pipe(inputs, seed=args.seed, sampling=_sampling(bundle, args), cfg_scale=args.cfg_scale,
                  max_new_tokens=args.max_new_tokens, **extra)
    results = result if isinstance(result, list) else [result]
    if isinstance(pipe, MediaToTextPipeline):
        for text in results:
            print(text)
        return 0
    batch = len(results) > 1
    if batch and args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    for i, media in enumerate(results):
        path = _media_path(pipe.plugin, args.out, pipe.modality, i if batch else None)
        pipe.plugin.write(media, str(path))
        print(f"wrote {path}")
    return 0


def _chat_turn(bundle: Any, chat: Any, history: list[dict[str, Any]], text: str, files: Sequence[str],
               args: argparse.Namespace, turn: int) -> None:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"--file {f}: no such file")
        parts.append({"type": modality_for_file(bundle, f), "path": f})
    history.append({"role": "user", "content": parts})
    reply = chat(history, seed=args.seed, sampling=_sampling(bundle, args), cfg_scale=args.cfg_scale,
                 max_new_tokens=args.max_new_tokens)
    out_dir = Path(args.out_dir)
    kept: list[dict[str, Any]] = []
    for i, part in enumerate(reply):
        if part["type"] == "text":
            print(part["text"])
            kept.append(part)
            continue
        plugin = bundle.tokenizers[part["type"]]
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"turn{turn}-{i}-{part['type']}{plugin.file_extensions[0]}"
        plugin.write(part["media"], str(path))
        print(f"[{part['type']}: wrote {path}]")
        kept.append({"type": part["type"], "ids": part["ids"]})
    history.append({"role": "assistant", "content": kept})


def cmd_chat(args: argparse.Namespace) -> int:
    from tessera.pipelines.bundle import load_bundle
    from tessera.pipelines.tasks import ChatPipeline

    bundle = load_bundle(_bundle_path(args.bundle), compile=args.compile)
    chat = ChatPipeline(bundle)
    history: list[dict[str, Any]] = []
    if args.message is not None or args.file:
        _chat_turn(bundle, chat, history, args.message or "", args.file, args, 0)
        return 0
    print("Tessera chat: type a message; `/file PATH` attaches a file to the next message; `/quit` ends.")
    files: list[str] = []
    turn = 0
    for line in sys.stdin:
        line = line.strip()
        if line in ("/quit", "/exit"):
            break
        if line.startswith("/file "):
            files.append(line[len("/file "):].strip())
            continue
        try:
            _chat_turn(bundle, chat, history, line, files, args, turn)
        except ValueError as e:  # a bad file or message: say so and keep the conversation going
            history = history[:-1] if history and history[-1]["role"] == "user" else history
            print(f"tessera: error: {e}", file=sys.stderr)
        files, turn = [], turn + 1
    return 0


def cmd_bundle_info(args: argparse.Namespace) -> int:
    from tessera.pipelines.bundle import load_bundle

    bundle = load_bundle(_bundle_path(args.bundle))
    v = bundle.vocab
    manifest = v.manifest()
    size_mb = sum(f.stat().st_size for f in bundle.path.rglob("*") if f.is_file()) / 1e6
    cfg = bundle.model.config
    print(f"bundle     {bundle.path}  ({size_mb:.1f} MB, every part checked against the manifest)")
    print(f"manifest   {manifest['hash'][:16]}  vocabulary {v.size} ids")
    print(f"text       ids 0..{v.text_size - 1}  (sentencepiece, sha256 {manifest['text']['sha256'][:12]})")
    print(f"llm        {bundle.model.num_params() / 1e6:.2f}M parameters, {cfg.n_layers} layers, "
          f"dim {cfg.dim}, context {cfg.max_seq_len}")
    print("modalities:")
    for entry in manifest["modalities"]:
        spec = entry["spec"]
        layout = spec["layout"]
        print(f"  {entry['name']:<10} {spec['media_kind']:<7} ids {entry['start']}..{entry['stop'] - 1} "
              f"({entry['stop'] - entry['start']}), layout {layout['kind']} levels {layout['levels']}, "
              f"fingerprint {spec['fingerprint'][:12]}")
    return 0


def cmd_bundle_add_modality(args: argparse.Namespace) -> int:
    from tessera.core.registry import get_modality
    from tessera.pipelines.bundle import add_modality, load_bundle, save_bundle

    bundle = load_bundle(_bundle_path(args.bundle))
    cls = get_modality(args.modality)
    if args.checkpoint is None and not args.debug:
        raise ValueError(f"give --checkpoint FOLDER (the trained {args.modality} tokenizer, e.g. from "
                         f"`tessera tokenizer train {args.modality}`) or --debug for an untrained tiny one")
    plugin = cls.debug() if args.checkpoint is None else cls.load(str(args.checkpoint))
    grown = add_modality(bundle, plugin, freeze_old=args.freeze_old)
    out = Path(args.out) if args.out else bundle.path
    save_bundle(grown, out)
    entry = grown.vocab.manifest()["modalities"][-1]
    print(f"added {args.modality!r} as ids {entry['start']}..{entry['stop'] - 1}; wrote {out}. "
          f"Fine-tune on data with {args.modality} (`tessera tokenize` then `tessera train --init-from {out}/llm`)")
    return 0


def cmd_bundle_replace_modality(args: argparse.Namespace) -> int:
    from tessera.core.registry import get_modality
    from tessera.pipelines.bundle import load_bundle, replace_modality, save_bundle

    bundle = load_bundle(_bundle_path(args.bundle))
    plugin = get_modality(args.modality).load(str(args.checkpoint))
    replaced, counts = replace_modality(bundle, plugin)
    out = Path(args.out) if args.out else bundle.path
    save_bundle(replaced, out)
    print(f"replaced the {args.modality!r} tokenizer: {counts['kept']} embedding rows carried over, "
          f"{counts['fresh']} new; wrote {out}. The LLM has not seen the new codes yet: tokenize data with "
          f"this bundle (`tessera tokenize`) and fine-tune it (`tessera train --init-from {out}`)")
    return 0


def cmd_bundle_grow(args: argparse.Namespace) -> int:
    from tessera.pipelines.bundle import grow_llm, load_bundle, save_bundle

    bundle = load_bundle(_bundle_path(args.bundle))
    out = Path(args.out)
    if out.resolve() == bundle.path.resolve():
        raise ValueError(f"--out {out} is the bundle being grown; write the grown bundle to a new folder")
    before = bundle.model.config.n_layers
    grown = grow_llm(bundle, every=args.every)
    save_bundle(grown, out)
    print(f"grew the LLM from {before} to {grown.model.config.n_layers} layers "
          f"({bundle.model.num_params() / 1e6:.2f}M -> {grown.model.num_params() / 1e6:.2f}M parameters, same "
          f"outputs); wrote {out}. Fine-tune it so the new layers learn: `tessera train --data SHARDS "
          f"--init-from {out} --out RUN`")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch
    from tessera.core.checkpoint import load_json
    from tessera.llm.export import export_hf

    folder = _bundle_path(args.bundle)
    out = export_hf(folder / "llm", args.out, manifest=load_json(folder / "manifest.json"),
                    sentencepiece_model=folder / "text.model", dtype=getattr(torch, args.dtype))
    print(f"wrote a Hugging Face LlamaForCausalLM folder to {out} "
          f"(load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


# ---- the parser -------------------------------------------------------------------------
COMPILE_HELP = ("decode through torch.compile: 1.3-2x faster generation once the first request has compiled "
                "(about a minute on 2 CPU cores; needs a C++ compiler on the CPU)")


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", help="bundle folder (default: the default bundle)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same output)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, help="cap on generated tokens")
    p.add_argument("--cfg-scale", dest="cfg_scale", type=float,
                   help="classifier-free guidance for media (1 = off; default: the bundle's settings)")
    p.add_argument("--temperature", type=float, help="sampling temperature for text and media (0 = greedy)")
    p.add_argument("--top-k", dest="top_k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def _sub(sub: Any, name: str, help: str, example: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                       epilog=f"examples:\n{example}", formatter_class=_Formatter)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera", description="Tessera: every modality as tokens of one vocabulary, "
                                "read and written by one decoder-only LLM.", epilog=EXAMPLES, formatter_class=_Formatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = _sub(sub, "demo", "start the Gradio app (chat, one tab per task, tokenizer lab)",
             "  tessera demo\n  tessera demo my_bundle --port 7861", cmd_demo)
    d.add_argument("bundle", nargs="?", help="bundle folder (default: the default bundle, or a tiny untrained one "
                   "with a warning when it has not been built)")
    d.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for every interface)")
    d.add_argument("--port", type=int, default=7860)
    d.add_argument("--max-upload-mb", dest="max_upload_mb", type=float, default=20.0, help="largest upload")
    d.add_argument("--max-seconds", dest="max_seconds", type=float, default=30.0, help="longest audio/video upload")
    d.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=1024,
                   help="most tokens one request may generate")
    d.add_argument("--max-best-of", dest="max_best_of", type=int, default=32,
                   help="most samples a text->media request may draw to keep the best (the slider's top)")
    d.add_argument("--queue-size", dest="queue_size", type=int, default=16, help="requests that may wait")
    d.add_argument("--compile", action="store_true", help=COMPILE_HELP)

    g = _sub(sub, "generate", "run one task of a bundle: text-to-MODALITY or MODALITY-to-text",
             '  tessera generate text-to-image "a red circle on the left" --out red.png\n'
             '  tessera generate text-to-speech "hello world" "good night" --out speech/\n'
             "  tessera generate speech-to-text hello.wav --seed 1", cmd_generate)
    g.add_argument("task", help="text-to-MODALITY or MODALITY-to-text, for a modality of the bundle")
    g.add_argument("inputs", nargs="+", help="captions (text-to-...) or media files (...-to-text); several make a batch")
    g.add_argument("--out", help="output file for one item, output folder for a batch (default: ./MODALITY.EXT)")
    g.add_argument("--best-of", dest="best_of", type=int,
                   help="text-to-MODALITY: sample N spans per caption and keep the one the model itself captions "
                        "best (default: the bundle's settings, 1 = no reranking); costs N times the generation")
    _add_generation_options(g)

    c = _sub(sub, "chat", "chat with a bundle: text and media in, text and media out",
             '  tessera chat -m "Create an image: a red circle on the left"\n'
             '  tessera chat -m "Describe this image." --file red.png\n'
             "  tessera chat            # interactive: one message per line, /file PATH to attach", cmd_chat)
    c.add_argument("-m", "--message", help="one user message (without it: an interactive session on stdin)")
    c.add_argument("--file", action="append", default=[], help="attach a media file (repeatable)")
    c.add_argument("--out-dir", dest="out_dir", default="chat_media", help="where generated media are written")
    _add_generation_options(c)

    for name, (module, help_line) in FORWARDED.items():
        f = sub.add_parser(name, help=help_line, add_help=False)
        f.set_defaults(forward=module)

    t = _sub(sub, "tokenizer", "train, evaluate, encode with or decode with a modality tokenizer",
             "  tessera tokenizer train image --data builtin --out runs/image\n"
             "  tessera tokenizer eval image --checkpoint runs/image/final\n"
             "  tessera tokenizer train speech --help", cmd_tokenizer)
    t.add_argument("verb", choices=["train", "eval", "encode", "decode"])
    t.add_argument("modality", help="a registered modality, e.g. image, video, speech")
    t.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the plugin (see --help there)")

    b = sub.add_parser("bundle", help="inspect a bundle, add a modality, replace a modality's tokenizer or grow its LLM",
                       description="Inspect a bundle, add a modality, replace a modality's tokenizer or grow its LLM.",
                       formatter_class=_Formatter,
                       epilog="examples:\n  tessera bundle info\n"
                              "  tessera bundle add-modality BUNDLE motion --checkpoint runs/motion --out grown/")
    bsub = b.add_subparsers(dest="action", required=True, metavar="ACTION")
    bi = _sub(bsub, "info", "print a bundle's modalities, id ranges, fingerprints and model size",
              "  tessera bundle info\n  tessera bundle info my_bundle", cmd_bundle_info)
    bi.add_argument("bundle", nargs="?", help="bundle folder (default: the default bundle)")
    ba = _sub(bsub, "add-modality", "append a modality tokenizer to a bundle (its LLM grows append-only)",
              "  tessera bundle add-modality my_bundle motion --checkpoint runs/motion/final --out grown_bundle",
              cmd_bundle_add_modality)
    ba.add_argument("bundle", help="bundle folder")
    ba.add_argument("modality", help="registered modality name (built-in or from an installed plugin)")
    ba.add_argument("--checkpoint", help="the trained tokenizer's folder (what its save() wrote)")
    ba.add_argument("--debug", action="store_true", help="use the plugin's untrained debug() tokenizer (for trying)")
    ba.add_argument("--freeze-old", dest="freeze_old", action="store_true",
                    help="mark the old embedding rows frozen for fine-tuning")
    ba.add_argument("--out", help="new bundle folder (default: overwrite BUNDLE)")
    br = _sub(bsub, "replace-modality", "swap a modality's tokenizer for another checkpoint (the LLM keeps "
              "every other embedding row; the new codes need fine-tuning)",
              "  tessera bundle replace-modality my_bundle image --checkpoint runs/image_v4/final --out new_bundle",
              cmd_bundle_replace_modality)
    br.add_argument("bundle", help="bundle folder")
    br.add_argument("modality", help="the modality whose tokenizer is replaced, e.g. image")
    br.add_argument("--checkpoint", required=True, help="the new tokenizer's folder (what its save() wrote)")
    br.add_argument("--out", help="new bundle folder (default: overwrite BUNDLE)")
    bg = _sub(bsub, "grow", "make a bundle's LLM deeper without changing what it computes (a zero-output copy "
              "after every N-th layer, LLaMA Pro block expansion), to fine-tune with more capacity",
              "  tessera bundle grow my_bundle --every 2 --out deeper_bundle\n"
              "  tessera train --data shards/ --init-from deeper_bundle --out runs/deeper",
              cmd_bundle_grow)
    bg.add_argument("bundle", nargs="?", help="bundle folder (default: the default bundle)")
    bg.add_argument("--every", type=int, default=2, help="a copy after every N-th layer (2: 8 -> 12 layers; 1: doubles)")
    bg.add_argument("--out", required=True, help="the new bundle folder")

    e = _sub(sub, "export", "export a bundle's LLM to another format",
             "  tessera export hf my_bundle --out hf_model/", cmd_export)
    e.add_argument("format", choices=["hf"], help="hf: a Hugging Face LlamaForCausalLM folder")
    e.add_argument("bundle", nargs="?", help="bundle folder (default: the default bundle)")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    return p


def _forward(module: str, argv: list[str]) -> int:
    """Run a command that parses its own arguments."""
    result = importlib.import_module(module).main(argv)
    return result if isinstance(result, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in FORWARDED:
            return _forward(FORWARDED[argv[0]][0], argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except SystemExit as e:  # argparse (status 2 or 0), or a tool's `raise SystemExit("message")`
        if isinstance(e.code, str):
            print(e.code if e.code.startswith("tessera") else f"tessera: error: {e.code}", file=sys.stderr)
            return 2
        return int(e.code or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
