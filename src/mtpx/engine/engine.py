"""Engine: the loaded model plus everything around the decode loop, shared by `LLM` and the server's scheduler.

It owns the drafters' set-up (draft models and reduced draft heads, loaded once), the draft policies, sequence
creation and release, the rounds (speculative/loop.py: draft → verify → accept, on the thread count the tuner
chose) and the stats. A client holds a `Request` per generation: `open` it, `start` it (prefill), run
`decode_round` over one or many sequences and `Request.advance` each, then `finish` and `release` it. `stream` is
that sequence of calls for one request at a time (what `LLM.stream` runs).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mtpx.engine.constraints import GrammarCompiler, GrammarSpec
from mtpx.engine.fork import prefill_shared
from mtpx.engine.grouped import GroupedDrafter
from mtpx.engine.params import MODEL_DRAFTERS, FieldError, SamplingParams, SpecConfig, sampling_params
from mtpx.engine.request import Completion, Request, StreamEvent
from mtpx.engine.sequence import Sequence
from mtpx.engine.stats import generation_stats
from mtpx.errors import RequestError
from mtpx.speculative.chain import ChainDrafter
from mtpx.speculative.drafters import DraftHead, Drafter, DraftModelDrafter, MTPDrafter, NgramDrafter
from mtpx.speculative.suffix import GlobalSuffixStore, SuffixDrafter
from mtpx.speculative.loop import decode_round, prefill
from mtpx.speculative.policy import DraftPolicy
from mtpx.speculative.tree import supports_trees
from mtpx.threads import ThreadTuner
from mtpx.tokenizer import Tokenizer


class Engine:
    """What the backend that loaded the model decides comes in as plain values and callables, so the engine runs on
    any of them. model: the loaded main model (forward / logits / mtp_forward / new_state ...).
    static_state(max_len): a fixed-address cache for a sequence (run as static passes), or None: model.new_state;
    release_state(state): hands such a cache back. max_drafts: the most drafts a verify pass holds (None: any).
    row_block: rows per weight read of step matmuls (the draft policy's cost floor), None where rows are not
    blocked. load_draft_model(name): a draft checkpoint, loaded as the main model was, sharing its vocabulary."""

    def __init__(self, model: Any, tokenizer: Tokenizer, *, vocab_size: int, max_context: int, eos: set[int],
                 sampling_defaults: dict | None = None, static_state: Callable[[int], Any] | None = None,
                 release_state: Callable[[Any], None] | None = None, max_drafts: int | None = None,
                 row_block: int | None = None, thread_tuner: ThreadTuner | None = None,
                 load_draft_model: Callable[[str], Any] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_context = max_context
        self.eos = set(eos)
        self.sampling_defaults = dict(sampling_defaults or {})
        self.static_state = static_state
        self.release_state = release_state
        self.max_drafts = max_drafts
        self.row_block = row_block
        self.thread_tuner = thread_tuner
        self.load_draft_model = load_draft_model
        self.draft_models: dict[str, Any] = {}
        self.draft_heads: dict[int, DraftHead] = {}
        self.suffix_store: GlobalSuffixStore | None = None  # earlier outputs, for spec_suffix_cache > 0
        self.policies: dict[tuple, DraftPolicy] = {}  # one per drafter setting and kind of sampling (see policy())
        self.grammars = GrammarCompiler(tokenizer, vocab_size, self.eos) if tokenizer is not None else None

    # ---- settings ------------------------------------------------------------------------------------------------
    def sampling_params(self, **given: Any) -> SamplingParams:
        """SamplingParams of the given values; those None come from the model's sampling_defaults."""
        return sampling_params(given, self.sampling_defaults)

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt given as text or ids, checked against the vocabulary."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise RequestError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return ids

    def check_grammar(self, grammar: GrammarSpec | None) -> None:
        """Compile `grammar` now (cached), so that a bad one is a FieldError naming its field before the request is
        queued."""
        if grammar is None:
            return
        if self.grammars is None:
            raise RequestError("structured outputs need the model's tokenizer, and this checkpoint has none")
        self.grammars.compile(grammar)

    def breaker_ids(self, breakers: tuple[str, ...]) -> frozenset[int]:
        """The token ids that hold one of DRY's sequence breakers."""
        if not breakers:
            return frozenset()
        if self.tokenizer is None:
            raise RequestError("dry_sequence_breakers need the model's tokenizer, and this checkpoint has none; "
                               "pass an empty list")
        return self.tokenizer.ids_containing(breakers)

    # ---- drafting ------------------------------------------------------------------------------------------------
    def drafter(self, spec: SpecConfig, batched: bool = False) -> Drafter | None:
        """The drafter of `spec` (None without speculation). batched: for a continuously batched set of sequences,
        whose catch-up passes are then grouped by length (engine/grouped.py). A chain (spec_type mtp,ngram) is a
        ChainDrafter over its lookup drafters and its model drafter."""
        kinds = spec.drafters
        if kinds == ("none",):
            return None
        models = [self._model_drafter(kind, spec, batched) for kind in kinds if kind in MODEL_DRAFTERS]
        lookups = [self._lookup_drafter(kind, spec) for kind in kinds if kind not in MODEL_DRAFTERS]
        if not lookups:
            return models[0]
        if kinds == ("ngram",):
            return lookups[0]  # alone, n-gram lookup drafts the policy's k tokens wherever it matches
        return ChainDrafter(lookups, models[0] if models else None)

    def _model_drafter(self, kind: str, spec: SpecConfig, batched: bool) -> Drafter:
        if kind == "mtp":
            if self.model.mtp is None and len(spec.drafters) > 1:
                raise FieldError("spec_type", f"spec_type {spec.spec_type!r}: mtp drafts with the model's MTP layer, "
                                 "and this checkpoint has none (use ngram, suffix or draft in the chain)")
            drafter = MTPDrafter(self.model, spec.spec_draft_p_min, self.draft_head(spec.spec_draft_vocab),
                                 sum(spec.spec_draft_tree or ()))
        else:
            if not spec.spec_draft_model:
                raise RequestError("spec_type 'draft' needs spec_draft_model (a checkpoint with the same tokenizer)")
            drafter = DraftModelDrafter(self.draft_model(spec.spec_draft_model), spec.spec_draft_p_min)
        return GroupedDrafter(drafter) if batched else drafter

    def _lookup_drafter(self, kind: str, spec: SpecConfig) -> Drafter:
        if kind == "ngram":
            return NgramDrafter(spec.spec_ngram_min, spec.spec_ngram_max)
        store = None
        if spec.spec_suffix_cache > 0:  # one store per engine: the server's requests, or one LLM's calls
            if self.suffix_store is None or self.suffix_store.capacity != spec.spec_suffix_cache:
                self.suffix_store = GlobalSuffixStore(spec.spec_suffix_cache)
            store = self.suffix_store
        return SuffixDrafter(store)

    def draft_head(self, size: int) -> DraftHead | None:
        """The MTP drafter's reduced-vocabulary head (built once per size); None for the full head (0 or >= V)."""
        if not size or size >= self.vocab_size:
            return None
        if size not in self.draft_heads:
            self.draft_heads[size] = DraftHead(self.model, size, self.eos)
        return self.draft_heads[size]

    def draft_model(self, name: str) -> Any:
        """The draft checkpoint `name`, loaded once."""
        if name not in self.draft_models:
            if self.load_draft_model is None:
                raise RequestError("this engine cannot load draft models")
            self.draft_models[name] = self.load_draft_model(name)
        return self.draft_models[name]

    def check_spec(self, spec: SpecConfig) -> None:
        """Limits that depend on how the model runs: static step passes hold the last token and max_drafts drafts."""
        if spec.speculative and self.max_drafts is not None and spec.spec_draft_n_max > self.max_drafts:
            raise RequestError(f"spec_draft_n_max is at most {self.max_drafts} with static step passes (CUDA "
                               f"graphs), got {spec.spec_draft_n_max}")
        if spec.spec_draft_tree is not None:
            if self.max_drafts is not None:
                raise FieldError("spec_draft_tree", "spec_draft_tree: static step passes (CUDA graphs) verify chains "
                                 "only; load the model with static_steps=False, or draft chains")
            if not supports_trees(self.model):
                raise FieldError("spec_draft_tree", "spec_draft_tree: draft trees run on the Qwen3.5 family (Qwen3.5 "
                                 f"/ 3.6, Qwen3-Next); this model is {type(self.model).__name__}")

    def new_policy(self, spec: SpecConfig) -> DraftPolicy | None:
        """A fresh draft-length policy for `spec` (None without speculation)."""
        if not spec.speculative:
            return None
        self.check_spec(spec)
        return DraftPolicy(spec.spec_draft_n_max, spec.spec_draft_n_min, spec.spec_draft_policy == "adaptive",
                           self.row_block, spec.spec_draft_tree)

    def policy(self, spec: SpecConfig, params: SamplingParams) -> DraftPolicy | None:
        """The policy kept for this setting. What it measured (acceptance per position, the cost of rounds with k
        drafts) carries over to the next request with the same drafter and settings, as in the server, instead of
        being measured again each time: a short request would otherwise spend much of itself exploring."""
        if not spec.speculative:
            return None
        key = (spec, params.greedy, params.temperature, params.penalized)
        policy = self.policies.get(key)
        if policy is None:
            policy = self.policies[key] = self.new_policy(spec)
        policy.new_request()
        return policy

    # ---- sequences -----------------------------------------------------------------------------------------------
    def new_sequence(self, ids: list[int], max_tokens: int, params: SamplingParams, *, ignore_eos: bool = False,
                     synth_rates: list[float] | None = None, reserve: int = 8) -> Sequence:
        """A sequence with caches for its prompt, max_tokens more (capped by the context) and `reserve` drafts."""
        if max_tokens is None or int(max_tokens) < 1:
            raise RequestError(f"max_tokens must be >= 1, got {max_tokens}")
        if len(ids) + 1 > self.max_context:
            raise RequestError(f"prompt has {len(ids)} tokens; the model's context is {self.max_context}")
        max_tokens = min(int(max_tokens), self.max_context - len(ids))
        if params.dry:
            params = dataclasses.replace(params, dry_breaker_ids=self.breaker_ids(params.dry_sequence_breakers))
        max_len = min(len(ids) + max_tokens + reserve, self.max_context + reserve)
        state = self.static_state(max_len) if self.static_state is not None else self.model.new_state(max_len)
        synth = list(synth_rates) if synth_rates is not None else None
        constraint = None
        if params.grammar is not None:
            self.check_grammar(params.grammar)
            constraint = self.grammars.constraint(params.grammar)
        return Sequence(tokens=list(ids), n_prompt=len(ids), max_new=max_tokens, params=params,
                        eos=set() if ignore_eos else self.eos, state=state, max_len=max_len,
                        gen=None if params.greedy and synth is None else params.generator(), synthetic_rates=synth,
                        constraint=constraint)

    def open(self, ids: list[int], max_tokens: int, params: SamplingParams, *, stop: list[str] = (),
             ignore_eos: bool = False, spec: SpecConfig | None = None, started: float | None = None) -> Request:
        """A request for prompt `ids` (encoded and checked), not yet prefilled."""
        seq = self.new_sequence(ids, max_tokens, params, ignore_eos=ignore_eos,
                                synth_rates=spec.spec_synth_rates if spec is not None else None)
        return Request(seq, self.tokenizer, stop, time.perf_counter() if started is None else started)

    def release(self, seq: Sequence) -> None:
        """Return a finished sequence's static caches (and its drafter's) for the next request."""
        if self.release_state is None:
            return
        for state in (seq.state, getattr(seq.draft, "state", None)):
            if state is not None:
                self.release_state(state)

    # ---- rounds --------------------------------------------------------------------------------------------------
    def prefill(self, drafter: Drafter | None, seq: Sequence) -> list[int]:
        """loop.prefill, on the thread count the tuner chose (not one it is trying out)."""
        return self._on_preferred_threads(prefill, self.model, drafter, seq)

    def _on_preferred_threads(self, fn: Callable[..., Any], *args: Any) -> Any:
        tuner = self.thread_tuner
        if tuner is None or tuner.preferred == tuner.current:
            return fn(*args)
        torch.set_num_threads(tuner.preferred)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(tuner.current)

    def decode_round(self, drafter: Drafter | None, policy: DraftPolicy | None,
                     seqs: list[Sequence]) -> list[list[int]]:
        """loop.decode_round, timed for the thread tuner: the tokens each sequence emitted."""
        started = time.perf_counter()
        emitted = decode_round(self.model, drafter, policy, seqs)
        tuner = self.thread_tuner
        if tuner is not None and tuner.observe(sum(map(len, emitted)), time.perf_counter() - started,
                                               (type(drafter).__name__, len(seqs))):
            if policy is not None:  # round times measured on another thread count are no reference
                policy.restart_timing()
        return emitted

    def start(self, req: Request, drafter: Drafter | None) -> StreamEvent:
        """Prefill the request's prompt: its first token, as text that can be streamed."""
        new = self.prefill(drafter, req.seq)
        req.first_token_at = time.perf_counter()
        return req.advance(new)

    def start_shared(self, reqs: list[Request], drafter: Drafter | None) -> list[StreamEvent]:
        """Prefill requests for one prompt (the samples of an n > 1 request, each opened on its own) with a single
        pass of the prompt, its caches copied to the others (engine/fork.py): each one's first token as text."""
        if len(reqs) == 1:
            return [self.start(reqs[0], drafter)]
        news = self._on_preferred_threads(prefill_shared, self.model, drafter, [r.seq for r in reqs])
        now = time.perf_counter()
        events = []
        for req, new in zip(reqs, news):
            req.first_token_at = now
            events.append(req.advance(new))
        return events

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """[len, vocab] float32 logits of one plain forward of the main model over token_ids, no cache."""
        ids = torch.tensor([list(token_ids)], device=self.model.lm_head.weight.device)
        return self.model.logits(self.model(ids)).float()[0]

    def stats(self, req: Request, spec: SpecConfig | None = None, drafter: Drafter | None = None,
              now: float | None = None) -> dict:
        """engine/stats.py's stats of the request so far; with its drafter, the drafter's memory too."""
        return generation_stats(req.seq, started=req.started, first_token_at=req.first_token_at, now=now,
                                spec_type=spec.kind if spec is not None else "none",
                                drafter_memory_bytes=drafter.memory_bytes(req.seq) if drafter else 0)

    def finish(self, req: Request, spec: SpecConfig | None = None, drafter: Drafter | None = None) -> Completion:
        """The Completion of a finished request."""
        seq = req.seq
        return Completion(req.text, list(seq.generated), self.stats(req, spec, drafter), seq.finish_reason or "length",
                          seq.logprobs[:len(seq.generated)] if seq.params.logprobs is not None else None)

    def stream(self, prompt: str | list[int], params: SamplingParams, spec: SpecConfig, *, max_tokens: int = 128,
               stop: list[str] | str | None = None, ignore_eos: bool = False) -> Iterator[StreamEvent]:
        """One request from prompt to Completion, yielding text as it becomes final; the last event carries the
        Completion. Its caches go back to the pool also when the caller stops iterating early."""
        started = time.perf_counter()
        drafter = self.drafter(spec)
        self.check_spec(spec)
        policy = self.policy(spec, params) if drafter is not None else None
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        req = self.open(self.encode_prompt(prompt), max_tokens, params, stop=stops, ignore_eos=ignore_eos,
                        spec=spec, started=started)
        try:
            event = self.start(req, drafter)
            while not req.seq.finished:
                if event.text or event.token_ids:
                    yield event
                new = self.decode_round(drafter, policy, [req.seq])[0]
                event = req.advance(new)
            yield StreamEvent(event.text, event.token_ids, self.finish(req, spec, drafter), event.logprobs)
        finally:
            self.release(req.seq)
