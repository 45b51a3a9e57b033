"""Interleaved benchmark runs: every prompt is generated once per mode, modes round-robin, so that ratios between
modes come from measurements taken side by side (the machine's state drifts the same way for all of them).

One row per generation holds what `LLM.generate` measured (prefill, time to first token, decode time, acceptance
counts) plus two things the benchmark measures around it:
- the drafter's own pass over the prompt (the MTP layer's catch-up, the draft model's prefill), which the engine
  books as drafting time after the first token; `prefill_with_drafter_tokens_per_s` includes it;
- weights read while decoding (forward hooks count each pass over the main model, the MTP layer, lm_head, and on MoE
  models the distinct experts each pass routes to), for the roofline.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from mtpx.bench.memory import SequenceBytes
from mtpx.bench.prompts import Workload
from mtpx.engine.params import SpecConfig
from mtpx.errors import RequestError
from mtpx.models.linear import nbytes, weight_bytes
from mtpx.models.qwen3_5 import Experts, Qwen35Model

DEFAULT_K = 3
WARMUP_PROMPT = 512  # tokens of the first prompt the warm-up runs: enough to pick kernels, cheap at long contexts


LOOKUPS = ("ngram", "suffix")  # drafters a mode may chain after its own: adaptive+ngram is spec_type mtp,ngram


@dataclass(frozen=True)
class Mode:
    name: str
    spec_type: str  # none | mtp | draft | ngram | suffix, or a chain: mtp,ngram
    k: int  # drafts per round (the maximum for the adaptive policy)
    policy: str = "fixed"  # fixed | adaptive
    draft_vocab: int = 0  # MTP drafts from the first N token ids (DraftHead); 0 = full vocabulary
    tree: tuple[int, ...] | None = None  # an MTP draft tree's branches per depth (spec_draft_tree)

    @property
    def speculative(self) -> bool:
        return self.spec_type != "none"

    def spec(self, draft_model: str | None = None, synth_rates: list[float] | None = None) -> SpecConfig:
        """The SpecConfig this mode generates with."""
        if not self.speculative:
            return SpecConfig()
        drafts_with_model = "draft" in self.spec_type.split(",")
        if drafts_with_model and not draft_model:
            raise RequestError(f"mode {self.name!r} needs --spec-draft-model")
        return SpecConfig(self.spec_type, spec_draft_n_max=self.k, spec_draft_policy=self.policy,
                          spec_draft_vocab=self.draft_vocab, spec_synth_rates=synth_rates,
                          spec_draft_model=draft_model if drafts_with_model else None, spec_draft_tree=self.tree)

    @property
    def drafters(self) -> list[str]:
        return self.spec_type.split(",")


def parse_mode(name: str, adaptive_n_max: int = 4) -> Mode:
    """none | mtpK | mtp (= mtp3) | adaptive (MTP, adaptive k up to adaptive_n_max) | draft[K] | ngram[K] |
    suffix[K] | treeAxBxC (an MTP draft tree of A, B, C branches at depths 1, 2, 3: spec_draft_tree A,B,C; "x"
    because --modes splits at commas) | adaptive-treeAxBxC (the adaptive policy choosing among chains up to
    adaptive_n_max and the tree's cuts); mtp and tree modes take a reduced draft vocabulary as a suffix: mtp3v4096,
    adaptivev4096, tree3x2v4096. A mode followed by +ngram / +suffix chains those lookup drafters before it (k is
    then also theirs): adaptive+ngram drafts with spec_type mtp,ngram, suffix+mtp is not a mode (write
    adaptive+suffix)."""
    name = name.strip()
    m = re.fullmatch(r"(adaptive-)?tree(\d+(?:x\d+)*)(?:v(\d+))?", name)
    if m:
        try:
            tree = SpecConfig("mtp", spec_draft_tree=[int(w) for w in m[2].split("x")]).spec_draft_tree  # checked
        except RequestError as e:
            raise RequestError(f"mode {name!r}: {e}") from None
        k = max(adaptive_n_max, len(tree)) if m[1] else len(tree)
        return Mode(name, "mtp", k, "adaptive" if m[1] else "fixed", int(m[3] or 0), tree)
    base, *lookups = name.split("+")
    if lookups:
        if any(x not in LOOKUPS for x in lookups) or len(set(lookups)) != len(lookups):
            raise RequestError(f"unknown mode {name!r}: a chain is a mode followed by +ngram and / or +suffix, "
                               "e.g. adaptive+ngram")
        mode = parse_mode(base, adaptive_n_max)
        if mode.spec_type == "none" or set(mode.drafters) & set(lookups) or mode.tree is not None:
            raise RequestError(f"mode {name!r}: chain ngram / suffix after a drafting mode (not a tree), each once")
        return Mode(name, ",".join([mode.spec_type, *lookups]), mode.k, mode.policy, mode.draft_vocab)
    if name == "none":
        return Mode("none", "none", 0)
    m = re.fullmatch(r"adaptive(?:v(\d+))?", name)
    if m:
        return Mode(name, "mtp", adaptive_n_max, "adaptive", int(m[1] or 0))
    m = re.fullmatch(r"(mtp|draft|ngram|suffix)(\d*)(?:v(\d+))?", name)
    if not m or (m[3] and m[1] != "mtp"):
        raise RequestError(f"unknown mode {name!r}: use none, mtp1..mtpK, adaptive, draft[K], ngram[K], suffix[K], "
                           "treeAxBxC, adaptive-treeAxBxC (mtp, adaptive and trees with an optional draft vocabulary: "
                           "mtp3v4096), or chain +ngram / +suffix after one (adaptive+ngram)")
    k = int(m[2]) if m[2] else DEFAULT_K
    if k < 1:
        raise RequestError(f"mode {name!r}: the number of drafts must be >= 1")
    return Mode(name, m[1], k, draft_vocab=int(m[3] or 0))


def parse_modes(names: list[str], adaptive_n_max: int = 4) -> list[Mode]:
    modes = [parse_mode(n, adaptive_n_max) for n in names if n.strip()]
    if len({m.name for m in modes}) != len(modes):
        raise RequestError("a mode is listed twice")
    if not any(m.name == "none" for m in modes):  # speedups are ratios to plain decoding, measured alongside
        modes.insert(0, Mode("none", "none", 0))
    return modes


class WeightTraffic:
    """Counts bytes of weights read by forward passes (hooks). Dense weights: once per pass whatever the number of
    rows (a bandwidth-bound matmul reads each weight once). Routed experts: once per distinct expert per pass."""

    def __init__(self, model: Qwen35Model, draft_models: list[Qwen35Model] = ()):
        self.bytes = 0
        self.passes = 0  # of the main model: prefill and one per decode round
        self.handles = []
        for m in [model, *draft_models]:
            self._attach(m)
        self.handles.append(model.register_forward_hook(self._count_pass))

    def _count_pass(self, module, args, output) -> None:
        self.passes += 1

    @classmethod
    def sizes(cls, model: Qwen35Model) -> dict:
        expert_params = {id(p) for e in model.modules() if isinstance(e, Experts) for p in e.parameters()}

        def dense(module):  # leaving out the experts' stacks, as tensors or quantized (Experts.quantized)
            quantized = sum(nbytes(w) for e in module.modules() if isinstance(e, Experts)
                            for ws in (e.quantized or {}).values() for w in ws)
            return weight_bytes(module, expert_params) - quantized
        body = dense(model.model.layers) + dense(model.model.norm)
        experts = [e for e in model.modules() if isinstance(e, Experts)]
        per_expert = sum(nbytes(w) for w in experts[0].expert(0)) if experts else 0
        return {"main_dense": body, "lm_head": weight_bytes(model.lm_head),
                "mtp_dense": dense(model.mtp) if model.mtp is not None else 0, "per_expert": per_expert,
                "embedding_row": model.model.embed_tokens.weight[0].numel()
                * model.model.embed_tokens.weight.element_size()}

    def _attach(self, model: Qwen35Model) -> None:
        s = self.sizes(model)

        def adder(n):
            def hook(module, args, output):
                self.bytes += n
            return hook
        self.handles.append(model.register_forward_hook(adder(s["main_dense"])))
        self.handles.append(model.lm_head.register_forward_hook(adder(s["lm_head"])))
        if model.mtp is not None:
            self.handles.append(model.mtp.register_forward_hook(adder(s["mtp_dense"])))
        for e in model.modules():
            if isinstance(e, Experts):
                def expert_hook(module, args, output, per=s["per_expert"]):
                    self.bytes += int(torch.unique(args[2]).numel()) * per
                self.handles.append(e.register_forward_hook(expert_hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class DrafterPrefillTimer:
    """Times the drafter's work on the prompt: its start() (a draft model's prefill, the MTP layer's caches) and
    its prefill-mode passes (the MTP layer's catch-up on the prompt's (h_i, t_i+1) pairs). While attached it wraps
    the engine's drafter factory (to time each drafter's start) and those passes' methods of the models; the main
    model's own forward is not touched. Nested timed calls count once."""

    def __init__(self, engine, draft_models=()):
        self.seconds = 0.0
        self.active = False
        self.wrapped: list[tuple[object, str]] = []
        model = engine.model
        if getattr(model, "mtp", None) is not None:
            self._wrap(model, "mtp_forward", lambda args, kwargs: (args[3] if len(args) > 3 else kwargs.get("mode"))
                       == "prefill")
        for m in draft_models:
            self._wrap(m, "forward", lambda args, kwargs: (args[2] if len(args) > 2 else kwargs.get("mode"))
                       == "prefill")
        make = engine.drafter

        def drafter(*args, **kwargs):
            d = make(*args, **kwargs)
            if d is not None:
                self._wrap(d, "start", lambda args, kwargs: True)
            return d
        engine.drafter = drafter
        self.wrapped.append((engine, "drafter"))

    def _wrap(self, obj, name: str, timed_call) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            if self.active or not timed_call(args, kwargs):
                return inner(*args, **kwargs)
            self.active, t0 = True, time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.active = False
        setattr(obj, name, timed)
        if obj is not None and name != "start":
            self.wrapped.append((obj, name))

    def restore(self) -> None:
        for obj, name in self.wrapped:
            delattr(obj, name)  # the class's method again
        self.wrapped = []


@dataclass
class BenchConfig:
    modes: list[Mode]
    workloads: list[Workload]
    temperatures: list[float]
    repeat: int = 1
    synth_rates: list[float] | None = None
    draft_model: str | None = None
    seed: int = 0
    ignore_eos: bool = True
    warmup: bool = True
    sampling: dict = field(default_factory=dict)  # SamplingParams settings besides temperature, for every generation


def generation_kwargs(mode: Mode, cfg: BenchConfig, temperature: float, max_tokens: int, seed: int,
                      grammar: Any = None) -> dict:
    """The keywords of LLM.generate for one generation of `mode`. Under a grammar the generation ends with it (at
    the end of the JSON), eos or not: what comes after a finished grammar is not constrained, so not measured."""
    return dict(max_tokens=max_tokens, temperature=temperature, seed=seed,
                ignore_eos=cfg.ignore_eos and grammar is None, grammar=grammar,
                spec=mode.spec(cfg.draft_model, cfg.synth_rates), **cfg.sampling)


def run_one(llm, mode: Mode, prompt: str | list[int], cfg: BenchConfig, temperature: float, max_tokens: int,
            seed: int, traffic: WeightTraffic | None, timer: DrafterPrefillTimer | None, grammar: Any = None) -> dict:
    """One generation; returns a row of measurements."""
    kw = generation_kwargs(mode, cfg, temperature, max_tokens, seed, grammar)
    if timer is not None:
        timer.seconds = 0.0
    bytes_at_first = None
    completion = None
    group = getattr(llm, "group", None)
    collectives = None
    for event in llm.stream(prompt, **kw):
        if bytes_at_first is None and traffic is not None:
            bytes_at_first = traffic.bytes  # everything after this is decoding
        if collectives is None and group is not None:
            collectives = (group.stats.seconds, group.stats.bytes, traffic.passes if traffic is not None else 0)
        completion = event.completion
    s = completion.stats
    drafter_prefill_s = timer.seconds if timer is not None else 0.0
    row = {
        "prompt_tokens": s["prompt_tokens"], "generated_tokens": s["generated_tokens"],
        "prefill_s": s["prefill_s"], "time_to_first_token_s": s["time_to_first_token_s"],
        "decode_s": s["decode_s"], "decode_tokens": max(s["generated_tokens"] - 1, 0),
        "decode_tokens_per_s": s["decode_tokens_per_s"],
        "prefill_tokens_per_s": s["prefill_tokens_per_s"],
        "drafter_prefill_s": drafter_prefill_s,
        "prefill_with_drafter_tokens_per_s": s["prompt_tokens"] / (s["prefill_s"] + drafter_prefill_s)
        if s["prefill_s"] + drafter_prefill_s > 0 else 0.0,
        "drafts": s["drafts"], "drafted_tokens": s["drafted_tokens"], "accepted_tokens": s["accepted_tokens"],
        "acceptance_by_position": list(s["acceptance_by_position"]),
        "draft_s": s["draft_s"], "verify_s": s["verify_s"],
        "drafter_memory_bytes": s["drafter_memory_bytes"],
        "by_drafter": {d: {k: v[k] for k in ("drafts", "drafted_tokens", "accepted_tokens")}
                       for d, v in s.get("by_drafter", {}).items()},
        "decode_weight_bytes": (traffic.bytes - bytes_at_first) if traffic is not None and bytes_at_first is not None
        else None,
    }
    if collectives is not None:  # decode rounds over several ranks: time and bytes in their collectives
        row.update(collective_s=group.stats.seconds - collectives[0], collective_bytes=group.stats.bytes - collectives[1],
                   rounds=traffic.passes - collectives[2] if traffic is not None else None)
    return row


def run_bench(llm, cfg: BenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    """All generations, interleaved: for each temperature, workload, repeat and prompt, every mode in turn (the
    order of modes rotates from prompt to prompt). Returns one row per generation."""
    draft_models = []
    if any("draft" in m.drafters for m in cfg.modes) and cfg.draft_model:
        draft_models.append(llm.engine.draft_model(cfg.draft_model))
    timer = DrafterPrefillTimer(llm.engine, draft_models)
    sizes = SequenceBytes(llm.engine)  # after the timer, restored before it: each puts back what it found
    traffic = WeightTraffic(llm.model, draft_models)
    rows: list[dict] = []
    try:
        texts = {w.name: w.texts(llm.tokenizer) for w in cfg.workloads}
        ids = {name: [llm.encode_prompt(t) for t in ts] for name, ts in texts.items()}
        if cfg.warmup:  # first calls allocate and pick kernels (and constrained ones their paths): not measured
            warm = list({w.grammar: w for w in reversed(cfg.workloads)}.values())
            for w0 in warm:
                for mode in cfg.modes:
                    for temperature in cfg.temperatures:
                        run_one(llm, mode, ids[w0.name][0][-WARMUP_PROMPT:], cfg, temperature,
                                min(32, w0.max_tokens), cfg.seed, None, None, w0.grammar)
        n_total = len(cfg.temperatures) * cfg.repeat * sum(len(w.prompts) for w in cfg.workloads) * len(cfg.modes)
        done, started = 0, time.perf_counter()
        for temperature in cfg.temperatures:
            for w in cfg.workloads:
                for rep in range(cfg.repeat):
                    for i, prompt_ids in enumerate(ids[w.name]):
                        order = cfg.modes[i % len(cfg.modes):] + cfg.modes[:i % len(cfg.modes)]
                        seed = cfg.seed + 100003 * rep + i  # same seed for every mode of this prompt
                        for mode in order:
                            row = run_one(llm, mode, prompt_ids, cfg, temperature, w.max_tokens, seed, traffic, timer,
                                          w.grammar)
                            rows.append({"mode": mode.name, "workload": w.name, "temperature": temperature,
                                         "repeat": rep, "prompt_index": i, **row, **sizes.last})
                            done += 1
                        if (i + 1) % 5 == 0 or i + 1 == len(ids[w.name]):
                            elapsed = time.perf_counter() - started
                            log(f"bench: T={temperature:g} {w.name} repeat {rep + 1}/{cfg.repeat}: "
                                f"prompt {i + 1}/{len(ids[w.name])} ({done}/{n_total} generations, {elapsed:.0f} s)")
    finally:
        sizes.restore()
        timer.restore()
        traffic.remove()
    return rows


def mode_dicts(modes: list[Mode]) -> list[dict]:
    return [asdict(m) for m in modes]
