"""`mtpx chat --model M`: terminal chat with streaming replies, a stats line after each one, and history.

Commands: /exit (or /quit, Ctrl-D) leaves, /reset clears the history, /help lists them. Ctrl-C stops a reply.
"""
from __future__ import annotations

import argparse
import sys

from mtpx.commands.run import add_model_arguments, load_model, stats_line
from mtpx.engine.flags import (add_sampling_arguments, add_spec_arguments, model_has_mtp, sampling_options,
                               spec_from_args)
from mtpx.errors import RequestError
from mtpx.llm import LLM

HELP = "commands: /exit (or /quit, Ctrl-D) leave · /reset clear the history · /help this list · Ctrl-C stops a reply"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system prompt (default none)")
    p.add_argument("--max-tokens", "-n", type=int, default=512, help="most tokens per reply (default 512)")
    add_sampling_arguments(p)
    p.add_argument("--no-stats", action="store_true", help="do not print the stats line after each reply")
    add_spec_arguments(p)


def build_prompt(llm: LLM, system: str | None, history: list[dict], max_tokens: int) -> tuple[list[int], int]:
    """The templated prompt's token ids for the conversation, dropping the oldest exchanges until it leaves room for
    a reply. Returns (prompt ids, number of messages dropped)."""
    dropped = 0
    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + history[dropped:]
        prompt = llm.tokenizer.encode_chat(messages, add_generation_prompt=True)  # ids: a message's text stays text
        n = len(prompt)
        if n + min(max_tokens, 16) <= llm.max_context or dropped >= len(history) - 1:
            if n + 1 > llm.max_context:
                raise RequestError(f"the message is {n} tokens; the model's context is {llm.max_context}")
            return prompt, dropped
        dropped += 2  # one user + one assistant turn


def main(args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    llm = load_model(args)
    spec = spec_from_args(args, model_has_mtp(llm))
    kwargs = dict(max_tokens=args.max_tokens, spec=spec, **sampling_options(args))
    llm.engine.drafter(spec)  # fail early on bad settings (and load a draft model now, not at the first reply)
    tty = sys.stdin.isatty()
    print(f"mtpx chat · {llm.path} · speculation {spec.kind} · {HELP}", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if text == "/help":
            print(HELP, file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        try:
            prompt, dropped = build_prompt(llm, args.system, history, args.max_tokens)
        except RequestError as e:
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        if dropped:
            del history[:dropped]
            print(f"(dropped the {dropped} oldest messages to fit the context)", file=sys.stderr)
        reply, completion = [], None
        stream = llm.stream(prompt, **kwargs)
        try:
            for event in stream:
                sys.stdout.write(event.text)
                sys.stdout.flush()
                reply.append(event.text)
                completion = event.completion
        except KeyboardInterrupt:
            stream.close()
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": completion.text if completion else "".join(reply)})
        if completion is not None and not args.no_stats:
            extra = " · stopped at --max-tokens" if completion.finish_reason == "length" else ""
            print(stats_line(completion.stats) + extra, file=sys.stderr)
