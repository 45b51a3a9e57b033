"""The settings of one generation, one object per concern, each built by one function per source.

SamplingParams: how each token is chosen. SpecConfig: how drafts are proposed. Sources: Python keywords
(`sampling_params`, `spec_config`: what `LLM.generate` takes), the API's JSON fields (`sampling_from_json`,
`spec_from_json`), and CLI flags (mtpx/engine/flags.py). A bad value raises FieldError, which names the setting, so
the server can answer 400 with that `param`.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from mtpx.errors import RequestError

DRY_BREAKERS = ("\n", ":", "\"", "*")  # llama.cpp's default dry_sequence_breakers
MAX_LOGPROBS = 20  # most top_logprobs a request may ask for (OpenAI's cap)
MAX_SUFFIX_CACHE = 1 << 21  # tokens of earlier outputs the suffix drafter may keep (its index: ~500 bytes a token)
MAX_TREE_NODES = 64  # draft nodes a tree may hold (speculative/tree.py; the verify pass holds one more row)


class FieldError(RequestError):
    """A bad value of the setting `field`; `code` is the API's error code for it."""

    def __init__(self, field: str | None, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.field, self.code = field, code


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    # penalties on repeated tokens, with vLLM's semantics: presence and frequency (OpenAI's, subtracted from the
    # logits) count the generated tokens only; repetition (CTRL / HF transformers: divide a positive logit, multiply
    # a negative one) covers prompt and generated tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # DRY ("don't repeat yourself", llama.cpp's --dry-*): a token that would continue a run of tokens already seen in
    # the context (prompt and output) loses multiplier · base^(run - allowed_length) from its logit once the run is
    # allowed_length long; runs stop at sequence breakers, so a loop is penalised, a shared name or line start barely
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1  # the last n tokens of the context are searched; -1: all of them, 0: none
    dry_sequence_breakers: tuple[str, ...] = DRY_BREAKERS
    dry_breaker_ids: frozenset[int] = field(default=frozenset(), repr=False)  # the tokens containing a breaker
    # what the output must match (engine/constraints.py GrammarSpec: a JSON schema, any JSON object, a regex, EBNF);
    # its token mask applies to every position a token is chosen at, so speculation stays exact under it
    grammar: Any = None
    # log-probabilities of each chosen token (and of the `logprobs` most likely ones) under the processed
    # distribution (penalties and grammar mask applied, before temperature and truncation); None: not computed
    logprobs: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise FieldError("temperature", f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise FieldError("top_k", f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise FieldError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise FieldError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise FieldError(name, f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 10:
            raise FieldError("repetition_penalty", "repetition_penalty must be in (0, 10] (1 disables it), got "
                             f"{self.repetition_penalty}")
        if not self.dry_multiplier >= 0:
            raise FieldError("dry_multiplier",
                             f"dry_multiplier must be >= 0 (0 disables DRY), got {self.dry_multiplier}")
        if not self.dry_base >= 1:
            raise FieldError("dry_base", f"dry_base must be >= 1, got {self.dry_base}")
        if self.dry_allowed_length < 1:
            raise FieldError("dry_allowed_length", f"dry_allowed_length must be >= 1, got {self.dry_allowed_length}")
        if self.dry_penalty_last_n < -1:
            raise FieldError("dry_penalty_last_n", f"dry_penalty_last_n must be >= -1 (-1: the whole context), "
                               f"got {self.dry_penalty_last_n}")
        if isinstance(self.dry_sequence_breakers, str) or not all(
                isinstance(b, str) and b for b in self.dry_sequence_breakers):
            raise FieldError("dry_sequence_breakers", "dry_sequence_breakers must be a list of non-empty strings, got "
                               f"{self.dry_sequence_breakers!r}")
        self.dry_sequence_breakers = tuple(self.dry_sequence_breakers)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise FieldError("top_logprobs", f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def penalized(self) -> bool:
        return self.counts_tokens or self.dry

    @property
    def counts_tokens(self) -> bool:
        """Repetition, frequency or presence penalty: they depend on which tokens the context holds."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def dry(self) -> bool:
        return self.dry_multiplier > 0 and self.dry_penalty_last_n != 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams) if f.name != "dry_breaker_ids")


def sampling_params(given: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> SamplingParams:
    """SamplingParams from keyword values. A value left None comes from `defaults` (the model's generation config,
    as vLLM applies it), else SamplingParams' own (greedy)."""
    unknown = sorted(set(given) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling setting(s) {unknown}; known: {list(SAMPLING_FIELDS)}")
    return SamplingParams(**{**(defaults or {}), **{k: v for k, v in given.items() if v is not None}})


SPEC_ALIASES = {"none": "none", "mtp": "mtp", "draft-mtp": "mtp", "draft": "draft", "draft-simple": "draft",
                "ngram": "ngram", "ngram-simple": "ngram", "ngram-mod": "ngram",
                "suffix": "suffix"}  # llama.cpp's names accepted too (its n-gram variants all draft by lookup here)
MODEL_DRAFTERS = ("mtp", "draft")  # drafters that always propose; the others (lookups) only where the text matches
DRAFT_POLICIES = ("adaptive", "fixed")


def parse_spec_type(spec_type: str) -> tuple[str, ...]:
    """The drafters a spec_type names, aliases resolved: one name, or a chain such as 'mtp,ngram' (llama.cpp's
    'draft-mtp,ngram-mod'). FieldError naming spec_type for an unknown, empty or repeated drafter, `none` in a
    chain, or two model drafters (mtp and draft keep their own caches in the one slot a sequence has for them)."""
    if not isinstance(spec_type, str):
        raise FieldError("spec_type", f"spec_type must be a string, got {spec_type!r}", "invalid_type")
    names = [n.strip() for n in spec_type.split(",")]
    known = ", ".join(sorted(SPEC_ALIASES))
    if not any(names) or (len(names) > 1 and not all(names)):
        raise FieldError("spec_type", f"spec_type {spec_type!r} has an empty drafter name: give one of {known}, or "
                         "several separated by commas (a chain, e.g. mtp,ngram)")
    unknown = [n for n in names if n not in SPEC_ALIASES]
    if unknown:
        where = f"spec_type {spec_type!r}" if len(names) == 1 else f"drafter {unknown[0]!r} in spec_type {spec_type!r}"
        raise FieldError("spec_type", f"unknown {where}: use one of {known}, or several separated by commas (a "
                         "chain, e.g. mtp,ngram)")
    kinds = tuple(SPEC_ALIASES[n] for n in names)
    if len(kinds) > 1:
        repeated = sorted({k for k in kinds if kinds.count(k) > 1})
        if repeated:
            raise FieldError("spec_type", f"spec_type {spec_type!r} names the drafter {repeated[0]!r} twice")
        if "none" in kinds:
            raise FieldError("spec_type", f"spec_type {spec_type!r}: 'none' cannot be part of a chain")
        if sum(k in MODEL_DRAFTERS for k in kinds) > 1:
            raise FieldError("spec_type", f"spec_type {spec_type!r}: a chain holds at most one of mtp and draft")
    return kinds


@dataclass(frozen=True)
class SpecConfig:
    """How drafts are proposed. Field names are the public spelling everywhere: `LLM.generate(spec_type=...)`,
    `--spec-type`, the `spec_type` of /health. Hashable: the engine keeps one draft policy per setting."""
    # none | mtp | draft | ngram | suffix (or an alias in SPEC_ALIASES), or a chain of them: "mtp,ngram" — each
    # round the first lookup drafter (ngram, suffix, in the order given) that is confident drafts, else the model
    # drafter (mtp or draft, which always has a proposal)
    spec_type: str = "none"
    spec_draft_n_max: int = 3  # most drafts a round
    spec_draft_n_min: int = 0  # fewest drafts a round (the adaptive policy's floor)
    spec_draft_p_min: float = 0.0  # stop drafting when the drafter's top probability falls below this
    spec_draft_policy: str = "adaptive"  # adaptive (k chosen each round for tokens/s) | fixed (k = n_max)
    spec_draft_model: str | None = None  # the draft checkpoint of spec_type draft
    spec_ngram_min: int = 1
    spec_ngram_max: int = 4
    spec_draft_vocab: int = 0  # MTP drafts from the first N token ids (plus eos); 0: the full vocabulary
    # the suffix drafter also matches the outputs of earlier requests, up to this many tokens of them (the server
    # keeps one store; 0: each request's own prompt and output only)
    spec_suffix_cache: int = 0
    # a draft tree instead of a chain (speculative/tree.py): branches per depth, e.g. (3, 2, 1); given as one number
    # W (or "W"): W branches at each of spec_draft_n_max depths; "3,2,1" as a string too. None: chains
    spec_draft_tree: tuple[int, ...] | None = None
    # SYNTHETIC acceptance for benchmarks: position i accepted with probability P_i (the output is not the model's)
    spec_synth_rates: tuple[float, ...] | None = None

    def __post_init__(self):
        parse_spec_type(self.spec_type)
        if self.spec_draft_tree is not None:
            object.__setattr__(self, "spec_draft_tree", parse_tree_shape(self.spec_draft_tree, self.spec_draft_n_max))
            if self.drafters != ("mtp",):
                raise FieldError("spec_draft_tree", "spec_draft_tree: the MTP layer drafts the tree, so spec_type must "
                                 f"be mtp, got {self.spec_type!r}")
        if self.spec_draft_policy not in DRAFT_POLICIES:
            raise FieldError("spec_draft_policy",
                             f"spec_draft_policy must be 'adaptive' or 'fixed', got {self.spec_draft_policy!r}")
        if not 0 <= self.spec_suffix_cache <= MAX_SUFFIX_CACHE:
            raise FieldError("spec_suffix_cache", f"spec_suffix_cache must be in [0, {MAX_SUFFIX_CACHE}] tokens, got "
                             f"{self.spec_suffix_cache}")
        if self.spec_synth_rates is not None:
            object.__setattr__(self, "spec_synth_rates", tuple(float(r) for r in self.spec_synth_rates))

    @property
    def drafters(self) -> tuple[str, ...]:
        """The drafters, aliases resolved: ("mtp",), ("mtp", "ngram") for a chain, ("none",) without speculation."""
        return parse_spec_type(self.spec_type)

    @property
    def kind(self) -> str:
        """The drafter: none, mtp, draft, ngram or suffix (aliases resolved), or a chain of them joined by commas."""
        return ",".join(self.drafters)

    @property
    def speculative(self) -> bool:
        return self.kind != "none"

    def to_json(self) -> dict:
        """The settings as JSON fields (what /health reports, what spec_from_json reads)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["spec_type"] = self.kind
        if self.spec_synth_rates is not None:
            out["spec_synth_rates"] = list(self.spec_synth_rates)
        if self.spec_draft_tree is not None:
            out["spec_draft_tree"] = list(self.spec_draft_tree)
        return out


SPEC_FIELDS = tuple(f.name for f in fields(SpecConfig))


def parse_tree_shape(given: Any, depths: int) -> tuple[int, ...]:
    """A draft tree's branches per depth from one number W (W at each of `depths` depths), a string "W" or
    "3,2,1", or a sequence of numbers. FieldError naming spec_draft_tree where it is empty, holds a number below 1,
    or has more than MAX_TREE_NODES nodes in all."""
    def bad(why: str) -> FieldError:
        return FieldError("spec_draft_tree", f"spec_draft_tree {given!r}: {why}")
    value = given
    if isinstance(value, str):
        if not value.strip():
            raise bad("the tree is empty: give at least one depth")
        parts = [p.strip() for p in value.split(",")]
        if not all(p.lstrip("-").isdigit() for p in parts):
            raise bad("give the number of branches at each depth, e.g. 3,2,1, or one number W for W at each depth")
        value = int(parts[0]) if len(parts) == 1 else [int(p) for p in parts]
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        raise bad("must be a number of branches or a list of them, e.g. [3, 2, 1]")
    if isinstance(value, int):
        if depths < 1:
            raise bad("one number W means W branches at each of spec_draft_n_max depths, and spec_draft_n_max is "
                      f"{depths}")
        value = [value] * depths
    if not value:
        raise bad("the tree is empty: give at least one depth")
    if not all(isinstance(w, int) and not isinstance(w, bool) for w in value):
        raise bad("branches per depth must be whole numbers")
    if min(value) < 1:
        raise bad("every depth needs at least 1 branch")
    if sum(value) > MAX_TREE_NODES:
        raise bad(f"{sum(value)} nodes is wider than a verify pass takes (at most {MAX_TREE_NODES} nodes in all)")
    return tuple(value)


def spec_config(given: Mapping[str, Any]) -> SpecConfig:
    """SpecConfig from keyword values (the `spec_*` keywords of LLM.generate); None means the default."""
    unknown = sorted(set(given) - set(SPEC_FIELDS))
    if unknown:
        raise TypeError(f"unknown speculation setting(s) {unknown}; known: {list(SPEC_FIELDS)}")
    return SpecConfig(**{k: v for k, v in given.items() if v is not None})


def split_options(options: Mapping[str, Any]) -> tuple[dict, dict]:
    """Keyword options split into (sampling, speculation) ones; any other name is a TypeError, as for a function."""
    sampling = {k: v for k, v in options.items() if k in SAMPLING_FIELDS}
    spec = {k: v for k, v in options.items() if k in SPEC_FIELDS}
    unknown = sorted(set(options) - set(sampling) - set(spec))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}")
    return sampling, spec


# ---- JSON fields -------------------------------------------------------------------------------------------------
JSON_TYPES = {
    "number": ((int, float), "a number"), "integer": ((int,), "an integer"), "string": ((str,), "a string"),
    "boolean": ((bool,), "a boolean"), "array": ((list,), "an array"), "object": ((dict,), "an object"),
}


def json_field(data: Mapping[str, Any], name: str, kind: str | tuple[str, ...], default: Any = None) -> Any:
    """data[name] checked against JSON type(s) `kind`; missing or null gives `default`. An integer-valued float
    counts as an integer; a boolean is never a number."""
    value = data.get(name)
    if value is None:
        return default
    kinds = (kind,) if isinstance(kind, str) else kind
    for k in kinds:
        types, _ = JSON_TYPES[k]
        if isinstance(value, types) and (k == "boolean" or not isinstance(value, bool)):
            return value
        if k == "integer" and isinstance(value, float) and value.is_integer() and not isinstance(value, bool):
            return int(value)
    names = " or ".join(JSON_TYPES[k][1] for k in kinds)
    raise FieldError(name, f"'{name}' must be {names}, got {json.dumps(value)[:80]}", "invalid_type")


DRY_JSON = (("dry_multiplier", "number"), ("dry_base", "number"), ("dry_allowed_length", "integer"),
            ("dry_penalty_last_n", "integer"), ("dry_sequence_breakers", "array"))  # llama.cpp server's names


def sampling_from_json(data: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> SamplingParams:
    """SamplingParams from an OpenAI-style request body. Unset values come from `defaults` (the model's generation
    config), else OpenAI's (temperature 1); top_k -1 (vLLM's "off") means 0."""
    model = defaults or {}
    temperature = float(json_field(data, "temperature", "number", model.get("temperature", 1.0)))
    top_p = float(json_field(data, "top_p", "number", model.get("top_p", 1.0)))
    top_k = json_field(data, "top_k", "integer", model.get("top_k", 0))
    min_p = float(json_field(data, "min_p", "number", model.get("min_p", 0.0)))
    seed = json_field(data, "seed", "integer")
    penalties = {name: float(json_field(data, name, "number", model.get(name, default)))
                 for name, default in (("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                                       ("repetition_penalty", 1.0))}
    dry = {name: json_field(data, name, kind) for name, kind in DRY_JSON}
    dry = {name: value for name, value in dry.items() if value is not None}
    if seed is not None and not -2 ** 63 <= seed < 2 ** 64:
        raise FieldError("seed", f"'seed' must fit in 64 bits, got {seed}")
    if top_k == -1:
        top_k = 0
    if not 0 <= temperature <= 100:
        raise FieldError("temperature", f"'temperature' must be in [0, 2] (up to 100 accepted), got {temperature}")
    return SamplingParams(temperature, top_k, top_p, min_p, seed, **penalties, **dry)


SPEC_JSON = {"spec_type": "string", "spec_draft_n_max": "integer", "spec_draft_n_min": "integer",
             "spec_draft_p_min": "number", "spec_draft_policy": "string", "spec_draft_model": "string",
             "spec_ngram_min": "integer", "spec_ngram_max": "integer", "spec_draft_vocab": "integer",
             "spec_suffix_cache": "integer", "spec_synth_rates": "array",
             "spec_draft_tree": ("integer", "string", "array")}


def spec_from_json(data: Mapping[str, Any]) -> SpecConfig:
    """SpecConfig from JSON fields named as in to_json; absent ones keep their defaults."""
    given = {name: json_field(data, name, kind) for name, kind in SPEC_JSON.items()}
    rates = given.get("spec_synth_rates")
    if rates is not None and not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rates):
        raise FieldError("spec_synth_rates", "'spec_synth_rates' must be an array of numbers", "invalid_type")
    return spec_config(given)
