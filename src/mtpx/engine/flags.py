"""The CLI flags of SamplingParams and SpecConfig (llama.cpp's spellings and aliases), for every command that
generates: `add_*_arguments` adds them, `sampling_options` / `spec_from_args` read them back."""
from __future__ import annotations

import argparse
from collections.abc import Collection
from typing import Any

from mtpx.engine.params import SAMPLING_FIELDS, FieldError, SpecConfig, spec_config


def _default(value: float) -> str:
    return f"default: the model's generation config, else {value}"


def add_sampling_arguments(p: argparse.ArgumentParser, exclude: Collection[str] = ()) -> None:
    """How each token is chosen. Every default is None: unset values come from the model's generation config, else
    SamplingParams'. exclude: fields a command spells its own way (`mtpx bench` takes a list of temperatures)."""
    def add(field: str, *flags: str, **kw: Any) -> None:
        if field not in exclude:
            p.add_argument(*flags, dest=field, default=None, **kw)
    add("temperature", "--temperature", "--temp", type=float, help=f"0 = greedy ({_default(0)})")
    add("top_k", "--top-k", type=int, help=f"0 = off ({_default(0)})")
    add("top_p", "--top-p", type=float, help=_default(1))
    add("min_p", "--min-p", type=float, help=_default(0))
    add("seed", "--seed", type=int, help="random seed of sampled decoding (default: a fresh one each run)")
    add("repetition_penalty", "--repeat-penalty", "--repetition-penalty", type=float,
        help="divide positive / multiply negative logits of tokens already in prompt or output (1 = off; "
        f"{_default(1)})")
    add("presence_penalty", "--presence-penalty", type=float, help="subtract from tokens already generated (0)")
    add("frequency_penalty", "--frequency-penalty", type=float,
        help="subtract this times the number of times a token was generated (0)")
    add("dry_multiplier", "--dry-multiplier", type=float,
        help="DRY: penalise tokens that would continue a run already in the context (0 = off, the default; 0.8 is "
        "llama.cpp's suggestion)")
    add("dry_base", "--dry-base", type=float, help="DRY: growth of the penalty per token of run (1.75)")
    add("dry_allowed_length", "--dry-allowed-length", type=int,
        help="DRY: runs this long are free; longer ones are penalised (2)")
    add("dry_penalty_last_n", "--dry-penalty-last-n", type=int,
        help="DRY: search the last n tokens (-1 = the whole context, the default; 0 = off)")
    add("dry_sequence_breakers", "--dry-sequence-breaker", action="append",
        help="DRY: runs stop at tokens containing this string (repeatable; replaces the defaults '\\n' ':' '\"' "
        "'*'; 'none' for no breakers)")


def sampling_options(args: argparse.Namespace, exclude: Collection[str] = ()) -> dict:
    """The sampling values given on the command line (None: not given), as keywords of LLM.generate; `exclude` as
    given to add_sampling_arguments."""
    out = {name: getattr(args, name) for name in SAMPLING_FIELDS if hasattr(args, name) and name not in exclude}
    if "dry_sequence_breakers" in out:
        out["dry_sequence_breakers"] = sequence_breakers(out["dry_sequence_breakers"])
    return out


def sequence_breakers(given: list[str] | None) -> list[str] | None:
    """--dry-sequence-breaker values as strings: escapes like '\\n' read as the characters, 'none' as no breakers."""
    if given is None:
        return None
    if given == ["none"]:
        return []
    return [b.encode("latin-1", "backslashreplace").decode("unicode_escape") for b in given]


SPEC_FLAGS: dict[str, tuple[tuple[str, ...], dict]] = {
    # default None: spec_from_args picks mtp where the model has an MTP layer, else none
    "spec_type": (("--spec-type",), dict(default=None, help="none | mtp | draft | ngram | suffix, or a chain such as "
                                         "mtp,ngram or mtp,suffix (each round the first confident lookup drafter "
                                         "drafts, else the MTP layer); llama.cpp names draft-mtp, draft-simple, "
                                         "ngram-simple, ngram-mod accepted; default: mtp with the adaptive policy "
                                         "when the model has an MTP layer, else none; none turns speculation off")),
    "spec_draft_n_max": (("--spec-draft-n-max",), dict(type=int, default=3, help="most draft tokens a round")),
    "spec_draft_n_min": (("--spec-draft-n-min",), dict(type=int, default=0, help="fewest draft tokens a round "
                                                       "(the adaptive policy's floor)")),
    "spec_draft_p_min": (("--spec-draft-p-min",), dict(type=float, default=0.0, help="stop drafting when the "
                                                       "drafter's top probability falls below this")),
    "spec_draft_policy": (("--spec-draft-policy",), dict(default="adaptive", choices=["adaptive", "fixed"],
                                                         help="adaptive: draft length chosen each round from the "
                                                         "measured acceptance and costs; fixed: always n-max")),
    "spec_draft_model": (("--spec-draft-model",), dict(default=None, help="draft checkpoint for --spec-type draft")),
    "spec_ngram_min": (("--spec-ngram-min",), dict(type=int, default=1, help="shortest n-gram to look up")),
    "spec_ngram_max": (("--spec-ngram-max",), dict(type=int, default=4, help="longest n-gram to look up")),
    "spec_draft_vocab": (("--spec-draft-vocab",), dict(type=int, default=0, help="MTP drafts from the first N token "
                                                       "ids only (plus eos); 0 = the full vocabulary")),
    "spec_draft_tree": (("--spec-draft-tree",), dict(default=None, help="draft a tree with the MTP layer: branches "
                                                     "per depth, e.g. 3,2,1 (the 3 likeliest first tokens, 2 second "
                                                     "tokens below them, 1 third), or one number W for W at each of "
                                                     "--spec-draft-n-max depths; at most 64 nodes")),
    "spec_suffix_cache": (("--spec-suffix-cache",), dict(type=int, default=0, help="suffix drafting also matches the "
                                                         "outputs of earlier requests, up to N tokens of them "
                                                         "(0 = each request's own text only)")),
}


def add_spec_arguments(p: argparse.ArgumentParser, only: Collection[str] | None = None,
                       **defaults: Any) -> None:
    """Speculation flags (all, or `only` these fields); `defaults` overrides a field's default for one command."""
    for name, (flags, kw) in SPEC_FLAGS.items():
        if only is None or name in only:
            kw = dict(kw)
            if name in defaults:
                kw["default"] = defaults[name]
            if kw.get("default") is not None and "help" in kw:
                kw["help"] += f" (default {kw['default']})"
            p.add_argument(*flags, dest=name, **kw)


def spec_from_args(args: argparse.Namespace, has_mtp: bool | None = None) -> SpecConfig:
    """The SpecConfig the command line names (spec_synth_rates where the command has that flag). Without
    --spec-type: mtp (with the adaptive policy, which falls back to plain decoding where drafting does not pay) when
    the model has an MTP layer (`has_mtp`, see model_has_mtp), else none. A bad value is a FieldError whose message
    starts with the flag; one that names mtp where `has_mtp` is False too (None: not known)."""
    names = [*SPEC_FLAGS, "spec_synth_rates"]
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if given.get("spec_type") is None:
        given["spec_type"] = "mtp" if has_mtp else "none"
    try:
        spec = spec_config(given)
    except FieldError as e:
        flag = SPEC_FLAGS[e.field][0][0] if e.field in SPEC_FLAGS else e.field
        raise FieldError(e.field, f"{flag}: {e}", e.code) from None
    if has_mtp is False and "mtp" in spec.drafters:
        raise FieldError("spec_type", f"--spec-type {spec.spec_type}: mtp drafts with the model's MTP layer, and "
                         "this checkpoint has none (use ngram, suffix or draft)")
    return spec


def model_has_mtp(llm: Any) -> bool:
    """Whether a loaded LLM's model has an MTP layer to draft with."""
    return getattr(llm.model, "mtp", None) is not None
