"""`mtpx run`: generate from a prompt, streaming text to stdout and a stats line to stderr."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtpx.engine.flags import (add_sampling_arguments, add_spec_arguments, model_has_mtp, sampling_options,
                               spec_from_args)
from mtpx.llm import LLM


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help="checkpoint directory, .gguf file, or 'demo'")
    p.add_argument("--dtype", default=None, help="auto (default: bf16, or a GGUF's quantized weights as stored), bf16, fp16, fp32, "
                   "int8 or int4 (weight-only)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto: cuda where there is one)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: 1 or all cores, whichever decodes faster, measured as it runs; "
                   "env MTPX_THREADS)")
    p.add_argument("--tensor-parallel", "-tp", type=int, default=None, metavar="N",
                   help="run the model over N ranks (GPUs, or CPU processes), each holding 1/N of every layer's heads "
                   "and of the MLP / experts; started here, or one per process under torchrun")
    p.add_argument("--split-layers", "--sm-layer", default=None, metavar="N|P,P..",
                   help="run the model over ranks holding contiguous layer ranges (llama.cpp's --split-mode layer): "
                   "a stage count, or proportions such as 3,1 for cards of different sizes; the MTP layer on the last")
    p.add_argument("--no-generation-config", action="store_true",
                   help="ignore the sampling defaults of the model's generation config (generation_config.json, "
                   "GGUF general.sampling.*): unset values are greedy decoding's")


def load_model(args: argparse.Namespace) -> LLM:
    """The LLM that the model arguments name; says on stderr which sampling defaults its generation config sets."""
    llm = LLM(args.model, dtype=args.dtype, device=args.device, threads=args.threads or None,
              generation_config=not args.no_generation_config, tensor_parallel=args.tensor_parallel,
              split_layers=args.split_layers)
    if llm.sampling_defaults:
        values = ", ".join(f"{k}={v}" for k, v in llm.sampling_defaults.items())
        print(f"mtpx: the model's generation config sets {values} (flags and request fields override them; "
              "--no-generation-config ignores them)", file=sys.stderr)
    return llm


# below this many prompt tokens the stats line gives the time to the first token, not a prefill rate: a short
# prefill's time is the pass's fixed costs (on a busy 2-core machine the parallel regions of a 2-thread pass wait for
# a descheduled thread: 5 tokens took 2.4 s there, 22 ms on one thread), which "4.8 tok/s" misreported as speed
SHORT_PROMPT = 64


def stats_line(stats: dict) -> str:
    """One line of a generation's stats for stderr."""
    n = stats["prompt_tokens"]
    if n >= SHORT_PROMPT:
        prefill = f"prefill {stats['prefill_tokens_per_s']:.1f} tok/s"
    else:  # a pass's fixed costs, not per-token work, make up its time: a rate would mislead
        prefill = f"first token after {stats['time_to_first_token_s'] * 1000:.0f} ms"
    line = (f"prompt {n} tok, {prefill} | "
            f"generated {stats['generated_tokens']} tok, decode {stats['decode_tokens_per_s']:.1f} tok/s")
    if stats.get("drafts"):
        by_pos = " ".join(f"{a:.2f}" for a in stats["acceptance_by_position"])
        line += (f" | {stats['spec_type']}: accepted {stats['accepted_tokens']}/{stats['drafted_tokens']} "
                 f"({stats['acceptance_rate']:.1%}), by position [{by_pos}], "
                 f"mean acceptance length {stats['mean_acceptance_length']:.2f}")
    return line


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", "-p", default=None, help="prompt text (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt with the model's chat template")
    p.add_argument("--max-tokens", "-n", type=int, default=128, help="most tokens to generate (default 128)")
    add_sampling_arguments(p)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable; default none)")
    add_spec_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with text, token_ids, stats")
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="constrain the output to JSON matching this JSON schema (speculation stays exact)")
    p.add_argument("--grammar", metavar="FILE", dest="grammar_file", default=None,
                   help="constrain the output to this GBNF/EBNF grammar")


def grammar_from_args(args: argparse.Namespace):
    """The GrammarSpec of --json-schema / --grammar (engine/constraints.py), or None."""
    from mtpx.engine.constraints import GrammarSpec
    if getattr(args, "json_schema", None):
        return GrammarSpec.json_schema(Path(args.json_schema).read_text(encoding="utf-8"), "--json-schema")
    if getattr(args, "grammar_file", None):
        return GrammarSpec("ebnf", Path(args.grammar_file).read_text(encoding="utf-8"), "--grammar")
    return None


def main(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    llm = load_model(args)
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    spec = spec_from_args(args, model_has_mtp(llm))
    completion = None
    for event in llm.stream(prompt, max_tokens=args.max_tokens, stop=args.stop, spec=spec,
                            grammar=grammar_from_args(args), **sampling_options(args)):
        if not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        completion = event.completion
    if args.json:
        print(json.dumps({"text": completion.text, "token_ids": completion.token_ids, "stats": completion.stats,
                          "finish_reason": completion.finish_reason}))
    else:
        sys.stdout.write("\n")
        print(stats_line(completion.stats), file=sys.stderr)
        note = finish_note(completion.finish_reason, args.max_tokens, completion.stats["generated_tokens"])
        if note:
            print(note, file=sys.stderr)
    return 0


def finish_note(reason: str, max_tokens: int, generated: int) -> str | None:
    """Why generation ended, when it is not the model's own stop (eos or a stop string)."""
    if reason == "stop":
        return None
    if reason == "length":
        where = f"--max-tokens {max_tokens}" if generated >= max_tokens else "the end of the model's context"
        return f"finish reason: length (stopped at {where})"
    return f"finish reason: {reason}"
