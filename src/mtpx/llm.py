"""The public Python API: `LLM(model).generate(prompt, ...) -> Completion`, `LLM.stream(...)`, `LLM.logits(ids)`."""
from __future__ import annotations

import dataclasses
import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from mtpx import kernels
from mtpx.errors import ModelLoadError, RequestError
from mtpx.loading import build_model, load_checkpoint
from mtpx.models.graphs import WIDTH, StatePool, StaticState
from mtpx.models.linear import QUANTIZATIONS, STEP_ROWS, fuse_projections, pack_for_cpu, quantize, to_tiles
from mtpx.models.qwen3_5 import Qwen35Model
from mtpx.sampling import SamplingParams
from mtpx.speculative.drafters import DraftHead, Drafter, DraftModelDrafter, MTPDrafter, NgramDrafter
from mtpx.speculative.loop import Sequence, decode_round, prefill
from mtpx.speculative.policy import DraftPolicy
from mtpx.threads import ThreadTuner
from mtpx.tokenizer import IncrementalText

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC_ALIASES = {"none": "none", "mtp": "mtp", "draft-mtp": "mtp", "draft": "draft", "draft-simple": "draft",
                "ngram": "ngram", "ngram-simple": "ngram"}
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
QUANTIZED = set(QUANTIZATIONS)  # weight-only int8 (per output row) / int4 (groups of 32), bf16 activations


def resolve_model_path(model: str | Path) -> Path:
    """`demo` / `demo-draft` name the checkpoints bundled in the repository."""
    if str(model) in ("demo", "demo-draft"):
        path = REPO_ROOT / "models" / str(model)
        if not (path / "config.json").exists():
            raise ModelLoadError(f"the bundled {model} model is missing at {path}; rebuild it with scripts/build_demo.sh")
        return path
    return Path(model)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RequestError("device 'cuda' requested but no CUDA device is available")
    if not device.startswith(("cpu", "cuda")):
        raise RequestError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in QUANTIZED:
        return torch.bfloat16
    if dtype not in DTYPES:
        raise RequestError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPES) + sorted(QUANTIZED)}")
    return DTYPES[dtype]


def retain_freed_memory() -> None:
    """Let glibc keep freed memory instead of handing it back to the OS. Every decode round allocates fresh
    per-token Gated DeltaNet states (1 MiB a layer on the 0.8B body) and frees the previous round's; returned memory
    costs a page fault per 4 KiB when it is touched again (measured: verify of 4 tokens 17 -> 10 ms in the
    recurrence on the 0.8B body). Same idea as running PyTorch CPU inference on jemalloc / tcmalloc."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)  # first hand back what loading freed (fp32 / unfused copies)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB come from the heap
    except (OSError, AttributeError):  # not glibc: leave the allocator alone
        pass


def tune_cpu_process() -> None:
    """Process-wide settings for running (inference or training) on the CPU."""
    retain_freed_memory()
    # Gated DeltaNet's decays (e^(G_i - G_j) in a chunk, the state times e^g per token) underflow into subnormal
    # floats, on which x86 arithmetic is many times slower; flushing them to zero only changes values below 1.2e-38
    # (measured on the demo model: 1500-token prefill 330-370 -> 255-270 ms, a training step -13 %)
    kernels.flush_denormals()


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    stats: dict
    finish_reason: str = "length"


@dataclass
class StreamEvent:
    text: str  # new text since the previous event
    token_ids: list[int]  # new tokens since the previous event
    completion: Completion | None = None  # set on the last event


@dataclass
class _Request:
    seq: Sequence
    stop: list[str]
    started: float
    text: str = ""
    sent: int = 0  # characters of text already streamed
    sent_tokens: int = 0
    first_token_at: float = 0.0
    extra: dict = field(default_factory=dict)
    detokenizer: IncrementalText | None = None


class LLM:
    def __init__(self, model: str | Path, dtype: str | torch.dtype | None = None, device: str | None = None,
                 threads: int | None = None, static_steps: bool | None = None, generation_config: bool = True):
        """static_steps: run single-sequence step passes at fixed addresses and shapes (models/graphs.py), replayed
        as CUDA graphs on a GPU; default: on CUDA for dense models (MoE routing picks experts on the host).
        generation_config: sampling values a request leaves unset come from the model's recommended ones
        (generation_config.json, GGUF general.sampling.*), as in vLLM; False: mtpx's defaults (greedy)."""
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.quantization = dtype if isinstance(dtype, str) and dtype in QUANTIZED else None
        if self.quantization and self.device.type != "cpu":
            raise RequestError(f"dtype {dtype!r} runs on the CPU only; use bf16 on {self.device.type}")
        self.path = resolve_model_path(model)
        ckpt = load_checkpoint(self.path)
        if ckpt.tokenizer is None:
            raise ModelLoadError(f"{self.path} has no tokenizer.json")
        self.config = ckpt.config
        self.tokenizer = ckpt.tokenizer
        self.sampling_defaults: dict = dict(ckpt.sampling_defaults) if generation_config else {}
        self.model: Qwen35Model = self._prepare(build_model(ckpt, self.dtype, self.device))
        self.thread_tuner: ThreadTuner | None = None
        if self.device.type == "cpu":
            tune_cpu_process()
            threads = threads or int(os.environ.get("MTPX_THREADS", "0"))
            if threads:
                torch.set_num_threads(threads)
            elif (cores := len(os.sched_getaffinity(0))) > 1:
                # all cores are fastest while they are free, one is while another process is busy: measure
                self.thread_tuner = ThreadTuner([1, cores])
        self.eos = set(self.config.eos_token_id)
        # a decode step allocates hundreds of short-lived tensors, and each of Python's periodic cycle collections
        # would walk every object loaded so far (measured: ~4% of a 0.8B step); the loaded ones are long-lived
        gc.freeze()
        self._draft_models: dict[str, Qwen35Model] = {}
        self._draft_heads: dict[int, DraftHead] = {}
        self._policies: dict[tuple, DraftPolicy] = {}
        self.static_steps = (self.device.type == "cuda" and not self.config.is_moe) if static_steps is None \
            else static_steps
        self._states = StatePool(self.model.new_static_state)

    @property
    def step_row_block(self) -> int | None:
        """Rows per weight read of step matmuls (the CPU rowgemm kernel's block), for the draft policy."""
        if self.device.type != "cpu":
            return None
        return kernels.MAX_ROWS if kernels.rowgemm_available() else STEP_ROWS

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """[len, vocab] float32 logits of one plain forward of the main model, no cache."""
        ids = torch.tensor([list(token_ids)], device=self.device)
        return self.model.logits(self.model(ids)).float()[0]

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise RequestError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(f"prompt token ids out of range [0, {self.config.vocab_size}): {bad[:5]}")
        return ids

    def make_drafter(self, spec_type: str, *, spec_draft_p_min: float = 0.0, spec_draft_model: str | None = None,
                     spec_ngram_min: int = 1, spec_ngram_max: int = 4, spec_draft_vocab: int = 0) -> Drafter | None:
        kind = SPEC_ALIASES.get(spec_type)
        if kind is None:
            raise RequestError(f"unknown spec_type {spec_type!r}: use one of {sorted(SPEC_ALIASES)}")
        if kind == "none":
            return None
        if kind == "mtp":
            return MTPDrafter(self.model, spec_draft_p_min, self._draft_head(spec_draft_vocab))
        if kind == "ngram":
            return NgramDrafter(spec_ngram_min, spec_ngram_max)
        if not spec_draft_model:
            raise RequestError("spec_type 'draft' needs spec_draft_model (a checkpoint with the same tokenizer)")
        return DraftModelDrafter(self._draft_model(spec_draft_model), spec_draft_p_min)

    def _draft_head(self, size: int) -> DraftHead | None:
        """The MTP drafter's reduced-vocabulary head (built once per size); None for the full head (0 or >= V)."""
        if not size or size >= self.config.vocab_size:
            return None
        if size not in self._draft_heads:
            self._draft_heads[size] = DraftHead(self.model, size, self.eos)
        return self._draft_heads[size]

    def _draft_model(self, name: str) -> Qwen35Model:
        if name not in self._draft_models:
            ckpt = load_checkpoint(resolve_model_path(name))
            if ckpt.tokenizer is None or ckpt.tokenizer.vocab_size != self.tokenizer.vocab_size or \
                    ckpt.tokenizer.decode(list(range(min(256, self.tokenizer.vocab_size)))) != \
                    self.tokenizer.decode(list(range(min(256, self.tokenizer.vocab_size)))):
                raise RequestError(f"draft model {name} does not share the main model's vocabulary "
                                   f"({ckpt.tokenizer.vocab_size if ckpt.tokenizer else 'no'} vs "
                                   f"{self.tokenizer.vocab_size} tokens)")
            self._draft_models[name] = self._prepare(build_model(ckpt, self.dtype, self.device, with_mtp=False))
        return self._draft_models[name]

    def _prepare(self, model: Qwen35Model) -> Qwen35Model:
        if os.environ.get("MTPX_PACK", "1") != "0":
            if self.device.type == "cpu" and self.dtype == torch.bfloat16:
                pack_for_cpu(model)
            elif self.device.type == "cuda":  # fewer, wider matmuls: fewer kernels in a step pass
                fuse_projections(model)
        if self.quantization:
            quantize(model, self.quantization)
        elif self.device.type == "cpu" and self.dtype == torch.bfloat16:
            to_tiles(model)  # where the CPU has AMX: verify rows cost about one (models/linear.py TileWeight)
        return model

    def new_sequence(self, ids: list[int], max_tokens: int, params: SamplingParams, *, ignore_eos: bool = False,
                     spec_synth_rates: list[float] | None = None, reserve: int = 8, static: bool = False) -> Sequence:
        if max_tokens is None or int(max_tokens) < 1:
            raise RequestError(f"max_tokens must be >= 1, got {max_tokens}")
        if len(ids) + 1 > self.max_context:
            raise RequestError(f"prompt has {len(ids)} tokens; the model's context is {self.max_context}")
        max_tokens = min(int(max_tokens), self.max_context - len(ids))
        if params.dry:
            params = dataclasses.replace(params, dry_breaker_ids=self.breaker_ids(params.dry_sequence_breakers))
        max_len = min(len(ids) + max_tokens + reserve, self.max_context + reserve)
        state = self._states.acquire("main", max_len) if static else self.model.new_state(max_len)
        return Sequence(tokens=list(ids), n_prompt=len(ids), max_new=max_tokens, params=params,
                        eos=set() if ignore_eos else self.eos, state=state, max_len=max_len,
                        gen=None if params.greedy and spec_synth_rates is None else params.generator(),
                        synthetic_rates=spec_synth_rates)

    def breaker_ids(self, breakers: tuple[str, ...]) -> frozenset[int]:
        """The token ids that hold one of DRY's sequence breakers."""
        if not breakers:
            return frozenset()
        if self.tokenizer is None:
            raise RequestError("dry_sequence_breakers need the model's tokenizer, and this checkpoint has none; "
                               "pass an empty list")
        return self.tokenizer.ids_containing(breakers)

    def sampling_params(self, **given) -> SamplingParams:
        """SamplingParams of the given values; those None come from the model's sampling_defaults."""
        return SamplingParams(**{**self.sampling_defaults, **{k: v for k, v in given.items() if v is not None}})

    def generate(self, prompt: str | list[int], **kwargs) -> Completion:
        event = None
        for event in self.stream(prompt, **kwargs):
            pass
        return event.completion

    @torch.inference_mode()
    def stream(self, prompt: str | list[int], *, max_tokens: int = 128, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
               seed: int | None = None, stop: list[str] | str | None = None, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0, repetition_penalty: float | None = None,
               dry_multiplier: float | None = None, dry_base: float | None = None,
               dry_allowed_length: int | None = None, dry_penalty_last_n: int | None = None,
               dry_sequence_breakers: list[str] | None = None,
               spec_type: str = "none", spec_draft_n_max: int = 3, spec_draft_n_min: int = 0,
               spec_draft_p_min: float = 0.0, spec_draft_policy: str = "adaptive",
               spec_draft_model: str | None = None, spec_ngram_min: int = 1, spec_ngram_max: int = 4,
               spec_draft_vocab: int = 0,
               spec_synth_rates: list[float] | None = None, ignore_eos: bool = False) -> Iterator[StreamEvent]:
        """Generate, yielding text as it becomes final; the last event carries the Completion. Sampling values left
        None come from sampling_defaults, else SamplingParams' (greedy)."""
        started = time.perf_counter()
        params = self.sampling_params(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                                      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                      repetition_penalty=repetition_penalty, dry_multiplier=dry_multiplier,
                                      dry_base=dry_base, dry_allowed_length=dry_allowed_length,
                                      dry_penalty_last_n=dry_penalty_last_n,
                                      dry_sequence_breakers=dry_sequence_breakers)
        if spec_draft_policy not in ("adaptive", "fixed"):
            raise RequestError(f"spec_draft_policy must be 'adaptive' or 'fixed', got {spec_draft_policy!r}")
        drafter = self.make_drafter(spec_type, spec_draft_p_min=spec_draft_p_min, spec_draft_model=spec_draft_model,
                                    spec_ngram_min=spec_ngram_min, spec_ngram_max=spec_ngram_max,
                                    spec_draft_vocab=spec_draft_vocab)
        policy = None
        if drafter:
            self.check_draft_n_max(spec_draft_n_max)
            # what it measured (acceptance per position, the cost of rounds with k drafts) carries over to the next
            # request with the same drafter and settings, as in the server, instead of being measured again each
            # time: a short request would otherwise spend much of itself exploring
            key = (spec_type, spec_draft_model, spec_draft_vocab, spec_draft_p_min, spec_ngram_min, spec_ngram_max,
                   spec_draft_n_max, spec_draft_n_min, spec_draft_policy, params.greedy, params.temperature,
                   params.penalized, tuple(spec_synth_rates or ()))
            policy = self._policies.get(key)
            if policy is None:
                policy = self._policies[key] = DraftPolicy(spec_draft_n_max, spec_draft_n_min,
                                                           spec_draft_policy == "adaptive", self.step_row_block)
            policy.new_request()
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        seq = self.new_sequence(self.encode_prompt(prompt), max_tokens, params, ignore_eos=ignore_eos,
                                spec_synth_rates=spec_synth_rates, static=self.static_steps)
        try:
            req = _Request(seq, stops, started)
            new = self.prefill(drafter, seq)
            req.first_token_at = time.perf_counter()
            while True:
                event = self._advance(req, new)
                if seq.finished:
                    break
                if event.text or event.token_ids:
                    yield event
                new = self.decode_round(drafter, policy, [seq])[0]
            yield StreamEvent(event.text, event.token_ids, self._completion(req, drafter, spec_type))
        finally:  # also when the caller stops iterating
            self.release(seq)

    def prefill(self, drafter: Drafter | None, seq: Sequence) -> list[int]:
        """loop.prefill, on the thread count the tuner chose (not one it is trying out)."""
        tuner = self.thread_tuner
        if tuner is None or tuner.preferred == tuner.current:
            return prefill(self.model, drafter, seq)
        torch.set_num_threads(tuner.preferred)
        try:
            return prefill(self.model, drafter, seq)
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

    def check_draft_n_max(self, n_max: int) -> None:
        """Static step passes hold WIDTH positions: the last token and up to WIDTH - 1 drafts."""
        if self.static_steps and n_max >= WIDTH:
            raise RequestError(f"spec_draft_n_max is at most {WIDTH - 1} with static step passes (CUDA graphs), "
                               f"got {n_max}")

    def release(self, seq: Sequence) -> None:
        """Return a finished sequence's static caches (and its drafter's) to the pool for the next request."""
        for state in (seq.state, getattr(seq.draft, "state", None)):
            if isinstance(state, StaticState) and state.pool is self._states:
                self._states.release(state)
                state.pool = None  # released once, even if called again

    def _advance(self, req: _Request, new: list[int]) -> StreamEvent:
        """Update the request's text after `new` tokens; apply stop strings; return what can be streamed."""
        seq = req.seq
        gen = seq.generated
        visible = gen[:-1] if gen and gen[-1] in seq.eos else gen
        if req.detokenizer is None:
            req.detokenizer = IncrementalText(self.tokenizer)
        text = req.detokenizer.decode(visible)
        if req.stop:
            hits = [(i, s) for s in req.stop if (i := text.find(s, max(0, len(req.text) - len(s)))) >= 0]
            if hits:
                cut = min(hits)[0]
                stop_str = min(hits)[1]
                # keep tokens up to the one that completed the stop string, as plain decoding would
                n_before = len(gen) - len(new)
                for n in range(n_before + 1, len(gen) + 1):
                    if stop_str in self.tokenizer.decode(gen[:n]):
                        del seq.tokens[seq.n_prompt + n:]
                        break
                text = text[:cut]
                seq.finish_reason = "stop"
        req.text = text
        if seq.finished:
            safe = len(text)
        else:  # hold back an incomplete UTF-8 character or a possible start of a stop string
            safe = len(text) - 1 if text.endswith("\ufffd") else len(text)
            for s in req.stop:
                for j in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:j]):
                        safe -= j
                        break
        delta = text[req.sent:max(safe, req.sent)]
        req.sent = max(safe, req.sent)
        tokens = seq.generated[req.sent_tokens:]
        req.sent_tokens = len(seq.generated)
        return StreamEvent(delta, tokens)

    def _completion(self, req: _Request, drafter: Drafter | None, spec_type: str) -> Completion:
        seq, end = req.seq, time.perf_counter()
        n_gen = len(seq.generated)
        decode_s = end - req.first_token_at
        stats = {
            "prompt_tokens": seq.n_prompt,
            "generated_tokens": n_gen,
            "prefill_tokens_per_s": seq.n_prompt / seq.stats.prefill_s if seq.stats.prefill_s else 0.0,
            "decode_tokens_per_s": (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else 0.0,
            "time_to_first_token_s": req.first_token_at - req.started,
            "total_s": end - req.started,
            "spec_type": SPEC_ALIASES[spec_type],
            **seq.stats.as_dict(),
            "drafter_memory_bytes": drafter.memory_bytes(seq) if drafter else 0,
        }
        return Completion(req.text, list(seq.generated), stats, seq.finish_reason or "length")
