"""The ``tessera`` command: one entry point, subcommands mapped to typed functions.

Tokenizer commands are forwarded to the plugin's own ``cli`` module:
``tessera tokenizer train image --data builtin`` calls
``tessera.modalities.image.cli.main(["train", "--data", "builtin"])``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

EXAMPLES = """examples:
  tessera tokenizer train image --data builtin --out runs/image
  tessera tokenizer eval image --checkpoint runs/image/final
"""


def _plugin_cli(modality: str):
    from tessera.core.registry import get_modality

    cls = get_modality(modality)
    package = cls.__module__.rsplit(".", 1)[0] if cls.__module__.count(".") > 2 else cls.__module__
    try:
        return importlib.import_module(f"{package}.cli")
    except ModuleNotFoundError as e:
        raise SystemExit(f"tessera: the {modality!r} plugin ({package}) has no command-line tools") from e


def cmd_tokenizer(args: argparse.Namespace) -> int:
    return int(_plugin_cli(args.modality).main([args.verb, *args.rest]) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tessera",
        description="Tessera: every modality as tokens of one vocabulary.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tok = sub.add_parser(
        "tokenizer",
        help="train, evaluate, encode with or decode with a modality tokenizer",
        epilog="example: tessera tokenizer train image --data builtin --out runs/image",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tok.add_argument("verb", choices=["train", "eval", "encode", "decode"])
    tok.add_argument("modality", help="a registered modality, e.g. image, video, speech")
    tok.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the plugin (see --help there)")
    tok.set_defaults(func=cmd_tokenizer)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
