"""Prompt sets of the benchmark: `prompts/{code,chat,creative,edit}.json` shipped with mtpx (edit: a whole module
asked back with one small change, the repetitive workload of lookup and suffix drafting), or a user's own file.

A prompt file is either a JSON list of strings, or an object
`{"workload": name, "max_tokens": N, "chat": bool, "prompts": [str, ...]}`; `chat: true` wraps each prompt as a user
message with the model's chat template.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mtpx.errors import RequestError

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
WORKLOADS = ("code", "chat", "creative", "edit")
DEFAULT_MAX_TOKENS = 256


@dataclass
class Workload:
    name: str
    prompts: list[str]
    max_tokens: int
    chat: bool = False
    description: str = ""
    grammar: Any = None  # a GrammarSpec every generation is constrained by (the `NAME+json` twins of --json-schema)

    def texts(self, tokenizer) -> list[str]:
        """The prompts as the model sees them (chat-templated when `chat`)."""
        if not self.chat:
            return list(self.prompts)
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in self.prompts]


def load_workload_file(path: Path, name: str | None = None) -> Workload:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RequestError(f"cannot read prompt file {path}: {e}") from None
    if isinstance(raw, list):
        raw = {"prompts": raw}
    prompts = raw.get("prompts") if isinstance(raw, dict) else None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise RequestError(f"{path}: expected a non-empty JSON list of prompt strings (or {{\"prompts\": [...]}})")
    return Workload(name or raw.get("workload") or Path(path).stem, prompts,
                    int(raw.get("max_tokens") or DEFAULT_MAX_TOKENS), bool(raw.get("chat", False)),
                    str(raw.get("description", "")))


def constrained_twins(workloads: list[Workload], grammar: Any, suffix: str = "+json") -> list[Workload]:
    """Each workload again, named NAME+json, with every output constrained by `grammar`."""
    return [replace(w, name=w.name + suffix, grammar=grammar,
                    description=(w.description + "; " if w.description else "") + "output constrained to the JSON "
                    "schema of --json-schema") for w in workloads]


def load_workloads(names: list[str], prompts_file: str | None = None, max_prompts: int | None = None,
                   max_tokens: int | None = None) -> list[Workload]:
    """The shipped workloads by name, or (with `prompts_file`) one workload from the user's file."""
    if prompts_file:
        loaded = [load_workload_file(Path(prompts_file))]
    else:
        unknown = [n for n in names if n not in WORKLOADS]
        if unknown:
            raise RequestError(f"unknown workload(s) {unknown}: use {', '.join(WORKLOADS)} or --prompts FILE")
        loaded = [load_workload_file(PROMPT_DIR / f"{n}.json", n) for n in names]
    for w in loaded:
        if max_prompts:
            w.prompts = w.prompts[:max_prompts]
        if max_tokens:
            w.max_tokens = max_tokens
    return loaded
