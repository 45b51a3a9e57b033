"""The public Python API: `LLM(model).generate(prompt, ...) -> Completion`, `LLM.stream(...)`, `LLM.logits(ids)`."""
from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from mtpx.engine.engine import Engine
from mtpx.engine.params import SamplingParams, SpecConfig, sampling_params, spec_config, split_options
from mtpx.engine.request import Completion, StreamEvent
from mtpx.errors import ModelLoadError, RequestError
from mtpx.loading import load_checkpoint
from mtpx.loading.checkpoint import count_mtp_layers, kept_types
from mtpx.models.interface import CausalLM
from mtpx.models.linear import weight_bytes
from mtpx.parallel.config import ParallelConfig
from mtpx.parallel.group import Group
from mtpx.parallel.launch import join
from mtpx.parallel.mirror import MirroredEngine, follow
from mtpx.runners import STORED, RunnerConfig, resolve_device, resolve_dtype, select_runner
from mtpx.runners.distributed import DistributedRunner
from mtpx.runners.cpu import tune_cpu_process  # noqa: F401 - part of this module's public names
from mtpx.threads import ThreadTuner

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run_rank(kwargs: dict) -> None:
    """A spawned rank (mtpx/parallel/launch.py): build the same LLM, which then follows rank 0 until it closes."""
    LLM(**kwargs)


def resolve_model_path(model: str | Path) -> Path:
    """`demo` / `demo-draft` name the checkpoints bundled in the repository."""
    if str(model) in ("demo", "demo-draft"):
        path = REPO_ROOT / "models" / str(model)
        if not (path / "config.json").exists():
            raise ModelLoadError(f"the bundled {model} model is missing at {path}; rebuild it with scripts/build_demo.sh")
        return path
    return Path(model)


class LLM:
    """One request at a time over a loaded model: `generate` / `stream` / `logits`. The work around the decode loop
    (drafters, policies, sequences, stats) is its `engine`'s, which the server's scheduler shares."""

    def __init__(self, model: str | Path, dtype: str | torch.dtype | None = None, device: str | None = None,
                 threads: int | None = None, static_steps: bool | None = None, generation_config: bool = True,
                 runner_config: RunnerConfig | None = None, tensor_parallel: int | None = None,
                 split_layers: int | str | None = None):
        """static_steps: run single-sequence step passes at fixed addresses and shapes (runners/static.py), replayed
        as CUDA graphs on a GPU; default: on CUDA for dense models (MoE routing picks experts on the host).
        generation_config: sampling values a request leaves unset come from the model's recommended ones
        (generation_config.json, GGUF general.sampling.*), as in vLLM; False: mtpx's defaults (greedy).
        tensor_parallel / split_layers: run the model over that many ranks (mtpx/parallel/), heads split across
        them or contiguous layer ranges (a stage count, or proportions such as "3,1"). Started here, the other
        ranks are worker processes this one spawns; under torchrun every rank constructs the LLM, and on ranks
        other than 0 the constructor does not return: it repeats rank 0's calls until rank 0 closes, then exits."""
        # ---- loading: device and dtype, checkpoint, the runner and the model it prepared --------------------------
        self.device = resolve_device(device)
        self.path = resolve_model_path(model)
        ckpt = load_checkpoint(self.path)
        self.dtype, self.quantization = resolve_dtype(dtype, stores_quantized=bool(ckpt.quantized))
        if ckpt.tokenizer is None:
            raise ModelLoadError(f"{self.path} has no tokenizer.json")
        self.config = ckpt.config
        self.tokenizer = ckpt.tokenizer
        self.sampling_defaults: dict = dict(ckpt.sampling_defaults) if generation_config else {}
        # how passes run here (kernels, static passes, graphs), chosen once: mtpx/runners/
        runner_config = runner_config or RunnerConfig.from_env(static_steps=static_steps, threads=threads)
        self.parallel = ParallelConfig.parse(tensor_parallel, split_layers)
        self.parallel.check(self.config, self.device)
        if self.parallel.enabled and self.quantization == STORED:
            raise RequestError(f"{self.path.name} stores quantized weights, which are not kept as stored when the "
                               "model is split over ranks: give --dtype int8 or int4 (requantized) or bf16")
        self.group: Group | None = None
        if self.parallel.enabled:
            spawn = functools.partial(_run_rank, dict(
                model=str(model), dtype=dtype, device=device, threads=threads, static_steps=static_steps,
                generation_config=generation_config, runner_config=runner_config, tensor_parallel=tensor_parallel,
                split_layers=split_layers))
            self.group = join(self.parallel, self.device, spawn)
            self.device = self.group.device
            runner_config = dataclasses.replace(runner_config, static_steps=False, threads=runner_config.threads or (
                max(1, len(os.sched_getaffinity(0)) // self.group.world) if self.device.type == "cpu" else 0))
        self.runner = select_runner(self.device, self.dtype, self.quantization, self.config, runner_config)
        if self.group is not None:
            self.runner = DistributedRunner(self.runner, self.group, self.parallel)
        else:
            self.runner.check_memory(self.config, count_mtp_layers(ckpt.shapes),
                                     kept_types(ckpt) if self.quantization else None)
        self.model: CausalLM = self.runner.load(ckpt, shard=self.runner.shard if self.group is not None else None,
                                                keep_quantized=self.quantization is not None)
        self.thread_tuner: ThreadTuner | None = self.runner.thread_tuner()
        self.eos = set(self.config.eos_token_id)
        # a decode step allocates hundreds of short-lived tensors, and each of Python's periodic cycle collections
        # would walk every object loaded so far (measured: ~4% of a 0.8B step); the loaded ones are long-lived
        gc.freeze()
        self.static_steps = self.runner.static_steps
        # ---- the engine over the loaded model -------------------------------------------------------------------
        engine_class = MirroredEngine if self.group is not None and self.group.rank == 0 else Engine
        self.engine = engine_class(self.model, self.tokenizer, vocab_size=self.config.vocab_size,
                             max_context=self.config.max_position_embeddings, eos=self.eos,
                             sampling_defaults=self.sampling_defaults,
                             static_state=self._static_state if self.static_steps else None,
                             release_state=self.runner.release_state, max_drafts=self.runner.max_drafts,
                             row_block=self.runner.step_row_block, thread_tuner=self.thread_tuner,
                             load_draft_model=self._load_draft_model)
        if self.group is not None:
            # what each rank's main-model pass reads (the bench reports them; under layer split they differ)
            self.rank_weight_bytes = self.group.gather_object(
                weight_bytes(self.model, {id(p) for p in self.model.model.embed_tokens.parameters()} |
                             ({id(p) for p in self.model.mtp.parameters()} if self.model.mtp is not None else set())))
            if self.group.rank == 0:
                self.engine.attach(self.group)
                atexit.register(self.close)
            else:
                follow(self.engine, self.group)  # exits the process when rank 0 closes

    def close(self) -> None:
        """Stop the other ranks of a model run over several (nothing to do on one device)."""
        if self.group is not None:
            self.group.close()

    def _static_state(self, max_len: int):
        return self.runner.new_state(self.model, max_len)

    @property
    def step_row_block(self) -> int | None:
        """Rows per weight read of step matmuls (the CPU rowgemm kernel's block), for the draft policy."""
        return self.runner.step_row_block

    def _load_draft_model(self, name: str) -> CausalLM:
        """A draft checkpoint, prepared by the same runner; it must share the main model's vocabulary."""
        ckpt = load_checkpoint(resolve_model_path(name))
        if ckpt.tokenizer is None or ckpt.tokenizer.vocab_size != self.tokenizer.vocab_size or \
                ckpt.tokenizer.decode(list(range(min(256, self.tokenizer.vocab_size)))) != \
                self.tokenizer.decode(list(range(min(256, self.tokenizer.vocab_size)))):
            raise RequestError(f"draft model {name} does not share the main model's vocabulary "
                               f"({ckpt.tokenizer.vocab_size if ckpt.tokenizer else 'no'} vs "
                               f"{self.tokenizer.vocab_size} tokens)")
        runner = getattr(self.runner, "inner", self.runner)  # whole on every rank, as the main model's engine calls
        return runner.load(ckpt, with_mtp=False, keep_quantized=self.quantization is not None)

    def _draft_head(self, size: int):  # for tests/models/test_mtp.py; the engine owns the draft heads
        return self.engine.draft_head(size)

    # ---- requests -------------------------------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.engine.max_context

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """[len, vocab] float32 logits of one plain forward of the main model, no cache."""
        return self.engine.logits(token_ids)

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return self.engine.encode_prompt(prompt)

    def sampling_params(self, **given: Any) -> SamplingParams:
        """SamplingParams of the given values; those None come from the model's sampling_defaults."""
        return self.engine.sampling_params(**given)

    def generate(self, prompt: str | list[int], **kwargs: Any) -> Completion:
        """The whole generation at once; keywords as for `stream`."""
        event = None
        for event in self.stream(prompt, **kwargs):
            pass
        return event.completion

    def chat(self, messages: list[dict], *, tools: list[dict] | None = None, tool_choice: str | dict | None = None,
             response_format: dict | None = None, chat_template_kwargs: dict | None = None,
             reasoning_format: str = "auto", max_tokens: int = 512, **kwargs: Any) -> Completion:
        """A chat turn through the model's chat template, as the server answers it: `tools` / `tool_choice`
        (none, auto, required, {"type": "function", "function": {"name": ...}}), `response_format` (json_object,
        json_schema) and `chat_template_kwargs` in OpenAI's shapes; messages may hold assistant `tool_calls` and
        `tool` results. The Completion's `message` is the assistant message (content, reasoning_content,
        tool_calls); other keywords as for `stream` (logprobs=N for per-token logprobs)."""
        from mtpx.serve.output import Responder
        from mtpx.serve.structured import read_options, render_kwargs, template_messages
        given = {"tools": tools, "tool_choice": tool_choice, "response_format": response_format,
                 "chat_template_kwargs": chat_template_kwargs}
        opts = read_options({k: v for k, v in given.items() if v is not None}, chat=True)
        opts.logprobs = kwargs.pop("logprobs", None)
        checked = [{"role": m["role"] if m["role"] != "developer" else "system", "content": m.get("content") or ""}
                   for m in messages]
        text = self.tokenizer.apply_chat_template(template_messages(messages, checked), add_generation_prompt=True,
                                                  **render_kwargs(opts))
        ids = self.encode_prompt(text)
        completion = self.generate(ids, max_tokens=max_tokens, grammar=opts.grammar, logprobs=opts.logprobs,
                                   **kwargs)
        responder = Responder(self.tokenizer, chat=True, opts=opts, reasoning_format=reasoning_format,
                              prompt_tail=text[-200:], eos=self.eos)
        completion.message = responder.message(completion.text)
        completion.finish_reason = responder.finish_reason(completion.finish_reason)
        return completion

    @torch.inference_mode()
    def stream(self, prompt: str | list[int], *, max_tokens: int = 128, stop: list[str] | str | None = None,
               ignore_eos: bool = False, sampling: SamplingParams | None = None, spec: SpecConfig | None = None,
               **options: Any) -> Iterator[StreamEvent]:
        """Generate, yielding text as it becomes final; the last event carries the Completion.

        options: SamplingParams' fields (temperature, top_k, top_p, min_p, seed, presence_penalty,
        frequency_penalty, repetition_penalty, dry_*) and SpecConfig's (spec_type, spec_draft_n_max, ...), or
        whole `sampling` / `spec` objects instead. Sampling values left None come from the model's
        sampling_defaults, else SamplingParams' (greedy). spec_type left None: "mtp" (adaptive draft length) where
        the model has an MTP layer, else "none"; the output is the same either way."""
        given_sampling, given_spec = split_options(options)
        if sampling is not None and given_sampling:
            raise TypeError(f"pass sampling settings as `sampling` or as keywords, not both: {sorted(given_sampling)}")
        if spec is not None and given_spec:
            raise TypeError(f"pass speculation settings as `spec` or as keywords, not both: {sorted(given_spec)}")
        params = sampling if sampling is not None else sampling_params(given_sampling, self.sampling_defaults)
        if spec is None:
            if given_spec.get("spec_type") is None:
                given_spec = {**given_spec, "spec_type": "mtp" if self.model.mtp is not None else "none"}
            spec = spec_config(given_spec)
        yield from self.engine.stream(prompt, params, spec, max_tokens=max_tokens, stop=stop, ignore_eos=ignore_eos)
