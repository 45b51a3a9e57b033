"""`mtpx bench --context N[,N..]`: acceptance by draft position, decode speed and the drafter's memory per sequence
at long contexts.

Each context N is a workload `ctxN` whose prompts are N − max_tokens tokens of real text, so that generation ends at
N tokens of context: windows of one long document, mtpx's own Python sources in path order (or the prompts of
`--prompts FILE` joined), taken as token ids so every prompt has exactly that length. The windows of one context
are consecutive (evenly spread where the document is short; it repeats where it is shorter than one window). The
sources change from commit to commit, and the prompts with them: compare contexts and modes within one report (it
records its commit).

Memory per sequence, from the bench's rows (memory.SequenceBytes): the main model's caches (attention caches
allocated for the sequence's max length, Gated DeltaNet states) against what the drafter holds for that sequence alone
(the MTP layer's cache, allocated for the same positions, and its pending hidden states; a suffix index).
"""
from __future__ import annotations

import re
from pathlib import Path

from mtpx.bench.prompts import Workload
from mtpx.errors import RequestError

DEFAULT_MAX_TOKENS = 128
DEFAULT_PROMPTS = 2
MiB = 2**20


def parse_contexts(value: str) -> list[int]:
    """'1k,8k,32k' or '1024,8192' -> token counts (k = 1024), ascending, each once."""
    out = []
    for part in (p.strip().lower() for p in value.split(",")):
        m = re.fullmatch(r"(\d+)(k?)", part)
        if not m or int(m[1]) <= 0:
            raise RequestError(f"--context: expected positive token counts such as 1024 or 8k, got {part!r}")
        out.append(int(m[1]) * (1024 if m[2] else 1))
    if not out:
        raise RequestError("--context: give at least one context length")
    return sorted(set(out))


def source_texts() -> list[str]:
    """mtpx's own Python sources, each headed by its path: the long real-text document of the context prompts."""
    root = Path(__file__).resolve().parents[1]
    return [f"# mtpx/{p.relative_to(root).as_posix()}\n{p.read_text(encoding='utf-8')}"
            for p in sorted(root.rglob("*.py"))]


def document_ids(tokenizer, texts: list[str], needed: int) -> list[int]:
    """Token ids of the texts in order, encoded one at a time until `needed` tokens are there (or all of them)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text)
        if len(ids) >= needed:
            break
    if not ids:
        raise RequestError("--context: the document for the prompts is empty")
    return ids


def windows(ids: list[int], length: int, count: int) -> list[list[int]]:
    """`count` windows of `length` tokens: consecutive where the document holds them, else evenly spread; a
    document shorter than one window is repeated."""
    if len(ids) < length:
        ids = (ids * (length // len(ids) + 1))[:length]
    if len(ids) >= count * length or count == 1:
        starts = [i * length for i in range(count)]
    else:
        starts = [i * (len(ids) - length) // (count - 1) for i in range(count)]
    return [ids[s:s + length] for s in starts]


def context_workloads(contexts: list[int], tokenizer, model_context: int, max_prompts: int | None = None,
                      max_tokens: int | None = None, texts: list[str] | None = None) -> list[Workload]:
    """One workload `ctxN` per context N: prompts of N − max_tokens tokens, generating max_tokens."""
    gen = max_tokens or DEFAULT_MAX_TOKENS
    count = max_prompts or DEFAULT_PROMPTS
    too_long = [n for n in contexts if n > model_context]
    if too_long:
        raise RequestError(f"--context {','.join(map(str, too_long))}: longer than the model's context of "
                           f"{model_context} tokens; use a checkpoint with a longer one (e.g. `mtpx bench "
                           "gen-checkpoint --shape qwen3.5-0.8b`, 32768, with --spec-synth-rates)")
    too_short = [n for n in contexts if n <= gen]
    if too_short:
        raise RequestError(f"--context {','.join(map(str, too_short))}: a context must be longer than the "
                           f"{gen} tokens generated (--max-tokens)")
    doc = document_ids(tokenizer, texts if texts is not None else source_texts(), max(contexts) * count)
    source = "the prompts of --prompts, joined" if texts is not None else "mtpx's own Python sources"
    return [Workload(f"ctx{n}", windows(doc, n - gen, count), gen,
                     description=f"{n - gen}-token windows of {source}, generating {gen} tokens: {n} tokens of "
                     "context at the end") for n in contexts]


def measure_context_costs(model, workloads: list[Workload], draft_model=None, log=print) -> dict[str, dict]:
    """The cost model after each context's prompt (costmodel.measure_costs without timing prefills): what a step,
    a verify pass and a draft step cost where these generations decode. Keyed by workload name."""
    from mtpx.bench.costmodel import measure_costs
    out = {}
    for w in workloads:
        log(f"bench: cost model at {w.name}")
        out[w.name] = measure_costs(model, context=len(w.prompts[0]), draft_model=draft_model, prefills=0)
    return out


def add_context_predictions(records: list[dict], costs_by_context: dict[str, dict]) -> None:
    """Each context's records predicted from the costs measured at that context."""
    from mtpx.bench.costmodel import add_predictions
    for name, costs in costs_by_context.items():
        add_predictions([r for r in records if r["workload"] == name], costs)


def memory_rows(records: list[dict]) -> list[dict]:
    """Per context workload and speculative mode: the main caches and the drafter's bytes of one sequence."""
    out = []
    for r in records:
        if not r["workload"].startswith("ctx") or r["spec_type"] == "none" or r.get("cache_bytes") is None:
            continue
        main, drafter = r["cache_bytes"], r.get("drafter_sequence_bytes") or 0
        out.append({"workload": r["workload"], "mode": r["mode"], "temperature": r["temperature"],
                    "prompt_tokens": r["prompt_tokens_mean"], "cache_bytes": main,
                    "drafter_sequence_bytes": drafter, "ratio": drafter / main if main else None})
    return out


def costs_table(costs_by_context: dict[str, dict]) -> str:
    """Per context: a plain step, verify of k drafts and an MTP draft relative to it."""
    rel = {name: {int(k): v for k, v in c["verify_rel"].items()} for name, c in costs_by_context.items()}
    ks = sorted({k for r in rel.values() for k in r if k >= 1})
    lines = ["| workload | step ms | " + " | ".join(f"verify k={k} / step" for k in ks) + " | MTP draft / step |",
             "|---" * (len(ks) + 3) + "|"]
    for name, c in costs_by_context.items():
        draft = c.get("c_mtp_chain", c.get("c_mtp"))
        cells = [f"{1000 * c['plain_step_s']:.2f}"] + [f"{rel[name][k]:.2f}" if k in rel[name] else "–" for k in ks]
        cells.append(f"{draft:.3f}" if draft is not None else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def context_table(records: list[dict], costs_by_context: dict[str, dict] | None = None) -> str:
    """Acceptance by position and speed per context (decoding includes the drafter's pass over the prompt, which
    grows with it: shown apart), the costs at each context, then memory per sequence against the context."""
    from mtpx.bench.report import _f, _temp_label
    ctx = [r for r in records if r["workload"].startswith("ctx")]
    lines = ["| workload | T | mode | prompt tokens | decode tok/s | × plain | acceptance | by position | "
             "mean acc. len | drafter prompt pass ms |", "|---" * 10 + "|"]
    for r in ctx:
        spec = r["spec_type"] != "none"
        lines.append(f"| {r['workload']} | {_temp_label(r['temperature'])} | {r['mode']} | "
                     f"{r['prompt_tokens_mean']:.0f} | {_f(r['decode_tokens_per_s'])} | {_f(r['speedup'], '.2f')} | "
                     f"{_f(100 * r['acceptance_rate'], '.1f') + '%' if spec else '–'} | "
                     f"{' '.join(f'{a:.2f}' for a in r['acceptance_by_position']) if spec else '–'} | "
                     f"{_f(r['mean_acceptance_length'], '.2f') if spec else '–'} | "
                     f"{_f(1000 * r['drafter_prefill_s'], '.1f') if spec and 'drafter_prefill_s' in r else '–'} |")
    if costs_by_context:
        lines += ["", "Costs after each context's prompt (one-row step; verify of k drafts and an MTP draft, the "
                  "one-call greedy chain where it runs, relative to it):", "", costs_table(costs_by_context)]
    mem = memory_rows(records)
    if mem:
        lines += ["", "Memory of one sequence at the end of its generation (main: the model's attention caches, "
                  "allocated for the sequence's max length, and its Gated DeltaNet states; drafter: what it holds for "
                  "this sequence alone, e.g. the MTP layer's cache for the same positions and its pending hidden "
                  "states):", "",
                  "| workload | T | mode | main caches MiB | drafter per sequence MiB | drafter / main |",
                  "|---|---|---|---|---|---|"]
        for m in mem:
            lines.append(f"| {m['workload']} | {_temp_label(m['temperature'])} | {m['mode']} | "
                         f"{m['cache_bytes'] / MiB:.2f} | {m['drafter_sequence_bytes'] / MiB:.2f} | "
                         f"{_f(m['ratio'], '.3f')} |")
    return "\n".join(lines)
