"""`mtpx <command>`: each command lives in its own module exposing `add_arguments(parser)` and `main(args) -> int`."""
from __future__ import annotations

import argparse
import importlib
import sys

from mtpx.errors import MtpxError

COMMANDS = {
    "run": ("mtpx.commands.run", "generate text from a prompt (streams; stats on stderr)"),
    "demo": ("mtpx.commands.demo", "the bundled model with MTP off and on, side by side"),
    "chat": ("mtpx.serve.chat", "terminal chat with streaming replies"),
    "serve": ("mtpx.serve.command", "OpenAI-compatible HTTP server and chat page"),
    "bench": ("mtpx.bench.cli", "benchmark speed, acceptance, prefill and memory across modes"),
    "train": ("mtpx.train.cli", "train a Qwen3.5-architecture model with its MTP layer from scratch"),
    "train-mtp": ("mtpx.train.mtp_cli", "add (or retrain) an MTP layer on an existing checkpoint"),
    "convert": ("mtpx.loading.convert", "convert a checkpoint to GGUF"),
    "plan": ("mtpx.commands.plan", "the device memory a model needs (weights, caches, overhead) and whether it fits"),
}


def version() -> str:
    """The installed package's version (pyproject.toml's, where mtpx runs from a source tree without metadata)."""
    from importlib import metadata
    try:
        return metadata.version("mtpx")
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--version", "-V"):
        print(f"mtpx {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
        print(f"usage: mtpx <command> [options]\n       mtpx --version\n\ncommands:\n{lines}\n\n"
              "'mtpx COMMAND --help' lists a command's options. run, chat and serve speculate with the model's MTP "
              "layer by default\n(--spec-type mtp, adaptive draft length) when it has one; --spec-type none turns "
              "it off.", file=sys.stdout if not argv or argv[0] in ("-h", "--help") else sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmtpx: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module_name, help_ = COMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"mtpx {argv[0]}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return module.main(args) or 0
    except MtpxError as e:
        print(f"mtpx {argv[0]}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
