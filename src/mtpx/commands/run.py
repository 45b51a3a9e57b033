"""`mtpx run`: generate from a prompt, streaming text to stdout and a stats line to stderr."""
from __future__ import annotations

import argparse
import json
import sys

from mtpx.llm import LLM


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help="checkpoint directory, .gguf file, or 'demo'")
    p.add_argument("--dtype", default=None, help="bf16 (default), fp16, fp32, int8 or int4 (weight-only, CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: 1 or all cores, whichever decodes faster, measured as it runs; "
                   "env MTPX_THREADS)")
    p.add_argument("--no-generation-config", action="store_true",
                   help="ignore the sampling defaults of the model's generation config (generation_config.json, "
                   "GGUF general.sampling.*): unset values are greedy decoding's")


def load_model(args: argparse.Namespace) -> LLM:
    """The LLM that the model arguments name; says on stderr which sampling defaults its generation config sets."""
    llm = LLM(args.model, dtype=args.dtype, device=args.device, threads=args.threads or None,
              generation_config=not args.no_generation_config)
    if llm.sampling_defaults:
        values = ", ".join(f"{k}={v}" for k, v in llm.sampling_defaults.items())
        print(f"mtpx: the model's generation config sets {values} (flags and request fields override them; "
              "--no-generation-config ignores them)", file=sys.stderr)
    return llm


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=128)
    add_decoding_arguments(p)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    """How each token is chosen: shared by `mtpx run` and `mtpx chat`."""
    def default(value: float) -> str:
        return f"default: the model's generation config, else {value}"
    p.add_argument("--temperature", "--temp", type=float, default=None, help=f"0 = greedy ({default(0)})")
    p.add_argument("--top-k", type=int, default=None, help=f"0 = off ({default(0)})")
    p.add_argument("--top-p", type=float, default=None, help=default(1))
    p.add_argument("--min-p", type=float, default=None, help=default(0))
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repeat-penalty", "--repetition-penalty", dest="repetition_penalty", type=float, default=None,
                   help="divide positive / multiply negative logits of tokens already in prompt or output (1 = off; "
                   f"{default(1)})")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="subtract from tokens already generated")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract this times the number of times a token was generated")
    p.add_argument("--dry-multiplier", type=float, default=None,
                   help="DRY: penalise tokens that would continue a run already in the context (0 = off, the "
                   "default; 0.8 is llama.cpp's suggestion)")
    p.add_argument("--dry-base", type=float, default=None, help="DRY: growth of the penalty per token of run (1.75)")
    p.add_argument("--dry-allowed-length", type=int, default=None,
                   help="DRY: runs this long are free; longer ones are penalised (2)")
    p.add_argument("--dry-penalty-last-n", type=int, default=None,
                   help="DRY: search the last n tokens (-1 = the whole context, the default; 0 = off)")
    p.add_argument("--dry-sequence-breaker", dest="dry_sequence_breakers", action="append", default=None,
                   help="DRY: runs stop at tokens containing this string (repeatable; replaces the defaults "
                   "'\\n' ':' '\"' '*'; 'none' for no breakers)")


def decoding_kwargs(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty, dry_multiplier=args.dry_multiplier, dry_base=args.dry_base,
                dry_allowed_length=args.dry_allowed_length, dry_penalty_last_n=args.dry_penalty_last_n,
                dry_sequence_breakers=sequence_breakers(args.dry_sequence_breakers))


def sequence_breakers(given: list[str] | None) -> list[str] | None:
    """--dry-sequence-breaker values as strings: escapes like '\\n' read as the characters, 'none' as no breakers."""
    if given is None:
        return None
    if given == ["none"]:
        return []
    return [b.encode("latin-1", "backslashreplace").decode("unicode_escape") for b in given]


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec-type", default="none",
                   help="none | mtp | draft | ngram (llama.cpp names draft-mtp, draft-simple, ngram-simple accepted)")
    p.add_argument("--spec-draft-n-max", type=int, default=3)
    p.add_argument("--spec-draft-n-min", type=int, default=0)
    p.add_argument("--spec-draft-p-min", type=float, default=0.0)
    p.add_argument("--spec-draft-policy", default="adaptive", choices=["adaptive", "fixed"])
    p.add_argument("--spec-draft-model", default=None, help="draft checkpoint for --spec-type draft")
    p.add_argument("--spec-ngram-min", type=int, default=1)
    p.add_argument("--spec-ngram-max", type=int, default=4)
    p.add_argument("--spec-draft-vocab", type=int, default=0,
                   help="MTP drafts from the first N token ids only (plus eos); 0 = the full vocabulary")


def spec_kwargs(args: argparse.Namespace) -> dict:
    return dict(spec_type=args.spec_type, spec_draft_n_max=args.spec_draft_n_max,
                spec_draft_n_min=args.spec_draft_n_min, spec_draft_p_min=args.spec_draft_p_min,
                spec_draft_policy=args.spec_draft_policy, spec_draft_model=args.spec_draft_model,
                spec_ngram_min=args.spec_ngram_min, spec_ngram_max=args.spec_ngram_max,
                spec_draft_vocab=args.spec_draft_vocab)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, stop=args.stop, **decoding_kwargs(args))


def stats_line(stats: dict) -> str:
    line = (f"prompt {stats['prompt_tokens']} tok, prefill {stats['prefill_tokens_per_s']:.1f} tok/s | "
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
    add_sampling_arguments(p)
    add_spec_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with text, token_ids, stats")


def main(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    llm = load_model(args)
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    kwargs = {**sampling_kwargs(args), **spec_kwargs(args)}
    completion = None
    for event in llm.stream(prompt, **kwargs):
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
    return 0
