"""`mtpx bench`: speed, acceptance, prefill, memory, cost model, roofline and peers across speculative modes.

    mtpx bench --model demo [--workloads code,chat,creative,edit] [--modes none,mtp3,adaptive,draft,ngram,suffix,
               adaptive+ngram,adaptive+suffix,...]
               [--temperature 0,0.7] [--repeat N] [--out DIR] [--prompts FILE] [--spec-synth-rates P0,P1,..]
               [--spec-draft-model PATH] [--max-prompts N] [--max-tokens N] [--peers hf,llamacpp]
               [--json-schema FILE] [--context 1k,8k,32k]
    mtpx bench gen-checkpoint --shape qwen3.5-0.8b|qwen3.5-moe-small|glm4.5-air-small|deepseek-v3-small|... --out DIR
    mtpx bench cache-size --shape deepseek-v3 [--model DIR] [--out FILE]   (cache bytes per token vs full K/V)
    mtpx bench report DIR        (re-render results.md and the plots from DIR/results.json)

Writes DIR/results.json (one record per mode × workload × temperature, plus the raw runs), DIR/results.md and PNG
plots. With --json-schema every workload runs twice, as itself and as NAME+json with each output constrained to the
schema (xgrammar; tokens the grammar forces are drafted for free), so MTP's gain with and without a schema comes from
one sitting. With --context the workloads are long prompts of real text at each context length (bench/context.py), and
the report adds each sequence's memory: the main model's caches against what the drafter holds for it. Synthetic
acceptance (`--spec-synth-rates`, for checkpoints whose MTP layer is untrained) is labelled as such in every record,
table and plot.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from mtpx.engine.flags import add_sampling_arguments, add_spec_arguments, sampling_options
from mtpx.errors import MtpxError, RequestError

DEFAULT_MODES = "none,mtp1,mtp2,mtp3,mtp4,adaptive,draft,ngram"
OWN_SAMPLING_FLAGS = ("temperature", "seed")  # a list of temperatures; the base seed of every prompt's generations


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _floats(value: str) -> list[float]:
    try:
        return [float(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def _contexts(value: str) -> list[int]:
    from mtpx.bench.context import parse_contexts
    try:
        return parse_contexts(value)
    except RequestError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def context_defaults() -> str:
    from mtpx.bench.context import DEFAULT_MAX_TOKENS, DEFAULT_PROMPTS
    return f"--max-tokens {DEFAULT_MAX_TOKENS} and --max-prompts {DEFAULT_PROMPTS} there."


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="checkpoint directory, .gguf file, or 'demo'")
    p.add_argument("--dtype", default=None, help="auto (default: bf16, or a GGUF's quantized weights as stored), bf16, fp16, fp32, "
                   "int8 or int4 (weight-only)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="CUDA: run step passes eagerly on the ordinary step path (no static passes, no graphs)")
    p.add_argument("--workloads", type=_csv, default=_csv("code,chat,creative"))
    p.add_argument("--modes", type=_csv, default=_csv(DEFAULT_MODES),
                   help="none, mtpK (K drafts), adaptive (MTP, adaptive k up to --adaptive-n-max), draft[K], ngram[K], "
                   "suffix[K]; a mode followed by +ngram / +suffix chains those lookups first (adaptive+ngram: "
                   "--spec-type mtp,ngram)")
    p.add_argument("--temperature", "--temperatures", type=_floats, default=[0.0, 0.7])
    p.add_argument("--repeat", type=int, default=3, help="repeats of the whole set (min / median over repeats)")
    # sampling settings for every generation (at T > 0 for top-k/p, min-p), the model's generation config ignored;
    # mtpx runs only
    add_sampling_arguments(p, exclude=OWN_SAMPLING_FLAGS)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--prompts", default=None, help="your own prompt set: a JSON list of strings")
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="also run every workload as NAME+json, each output constrained to this JSON schema and "
                   "ending with it (e.g. src/mtpx/bench/prompts/function.schema.json)")
    p.add_argument("--max-prompts", type=int, default=None, help="use the first N prompts of each workload")
    p.add_argument("--context", type=_contexts, default=None, metavar="N[,N..]",
                   help="long contexts instead of --workloads: a workload ctxN per context (1024, 8k, ...) whose "
                   "prompts are N - max_tokens tokens of real text (mtpx's sources, or --prompts joined), so "
                   "generation ends at N tokens; adds memory per sequence (main caches vs the drafter's). Default "
                   f"{context_defaults()}")
    p.add_argument("--max-tokens", type=int, default=None, help="override each workload's generation length")
    p.add_argument("--spec-synth-rates", type=_floats, default=None,
                   help="SYNTHETIC acceptance: accept drafted tokens by coin flips, position i with probability P_i "
                        "given positions < i were accepted (benchmarking only; the output is not the model's)")
    add_spec_arguments(p, only=("spec_draft_model",))  # for the draft modes; with --model demo: demo-draft
    p.add_argument("--adaptive-n-max", type=int, default=4)
    p.add_argument("--respect-eos", action="store_true", help="stop at end-of-sequence (default: ignore it, so "
                                                              "every mode generates the same number of tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                   help="run the model over N ranks, heads split (reports time in collectives per round and the "
                   "weight bytes rank 0 reads)")
    p.add_argument("--split-layers", default=None, metavar="N|P,P..",
                   help="run the model over ranks holding contiguous layer ranges: a stage count or proportions")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--no-memory", action="store_true", help="skip the per-mode memory processes")
    p.add_argument("--no-costs", action="store_true", help="skip the cost model")
    p.add_argument("--no-roofline", action="store_true", help="skip the bandwidth measurement")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--peers", type=_csv, default=[], help="also run hf, llamacpp on the same prompts (optional extras)")
    p.add_argument("--llama-server", default=None, help="llama.cpp server binary (default: llama-server on PATH)")
    p.add_argument("--gguf", default=None, help="GGUF of the same weights for llama.cpp (default: convert to DIR)")
    p.add_argument("--peer-modes", type=_csv, default=None,
                   help="modes for llama.cpp (none, mtpK); default: none and the MTP modes benchmarked")
    p.add_argument("--peer-max-prompts", type=int, default=None, help="prompts per workload for the peers")
    p.add_argument("--label", default=None, help="name of the model in titles (default: the model path)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    sub = p.add_subparsers(dest="subcommand", metavar="{gen-checkpoint,cache-size,report}")
    from mtpx.bench import cache_size, gen_checkpoint
    g = sub.add_parser("gen-checkpoint", help="write a random-weight checkpoint of a real model shape")
    gen_checkpoint.add_arguments(g)
    c = sub.add_parser("cache-size", help="cache bytes per token (MLA latent vs full K/V) from a config or shape")
    cache_size.add_arguments(c)
    r = sub.add_parser("report", help="re-render results.md and plots from a results directory")
    r.add_argument("dir", type=Path)


def machine_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        mem_gib = int(mem.split()[1]) / 2**20
    except (OSError, StopIteration):
        mem_gib = 0
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = ", ".join(f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f" {f}" in text)
    except OSError:
        pass
    desc = f"{os.cpu_count()} × {cpu}" + (f" ({flags})" if flags else "") + f", {mem_gib:.0f} GiB RAM"
    try:
        import torch
        if torch.cuda.is_available():
            desc += f", GPU {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - description only
        pass
    return {"machine": desc, "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1)}


def cpu_kernels_meta(llm) -> dict:
    """The CPU kernels' instruction set this run used (scalar, avx2, avx512, amx, neon; "pytorch" where they are not
    built), whether the weights' integer matmuls ran on VNNI (quantized weights only), and where the kernels came
    from (built at install, or on first use): the same machine runs several."""
    if llm.device.type != "cpu":
        return {}
    from mtpx import kernels
    return {"cpu_isa": kernels.isa(), "cpu_isas": kernels.cpu_isas(), "kernels": kernels.kernel_origin(),
            "int_dot_vnni": bool(llm.quantization) and kernels.int_dot_vnni()}


def machine_state() -> dict:
    """Load average and the busiest other processes: benchmark numbers mean little on a busy machine."""
    state: dict = {}
    try:
        state["loadavg"] = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        pass
    try:
        ps = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True, timeout=5)
        busy = []
        for line in ps.stdout.splitlines()[1:]:
            pid, pcpu, args = line.strip().split(None, 2)
            if int(pid) != os.getpid() and float(pcpu) >= 10:
                busy.append(f"{args[:80]} ({pcpu}% CPU)")
        state["busy_processes"] = busy[:5]
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return state


def describe_state(before: dict, after: dict) -> str:
    la = [f"{x:.2f}" for x in before.get("loadavg", [])]
    la2 = [f"{x:.2f}" for x in after.get("loadavg", [])]
    busy = sorted(set(before.get("busy_processes", [])) | set(after.get("busy_processes", [])))
    text = f"Load average before {'/'.join(la)}, after {'/'.join(la2)}."
    text += (" Other busy processes: " + "; ".join(busy) + ".") if busy else " No other busy processes seen."
    return text


def dtype_name(llm) -> str:
    """bfloat16, or for quantized weights e.g. "int8 weights, bfloat16 activations"."""
    name = str(llm.dtype).removeprefix("torch.")
    return f"{llm.quantization} weights, {name} activations" if llm.quantization else name


def git_commit() -> str:
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head + ("+dirty" if dirty else "") if head else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def render(result: dict, out: Path, plots: bool = True) -> list[Path]:
    from mtpx.bench import report
    out.mkdir(parents=True, exist_ok=True)
    paths = [report.write_json(result, out), report.write_markdown(result, out)]
    if plots:
        paths += report.write_plots(result, out)
    return paths


def run(args: argparse.Namespace) -> dict:
    import torch

    from mtpx.bench import aggregate, costmodel, prompts, roofline, runner
    from mtpx.engine.params import SamplingParams
    from mtpx.llm import LLM
    if not args.model:
        raise RequestError("--model is required")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeat < 1:
        raise RequestError("--repeat must be >= 1")
    off = SamplingParams()
    sampling = {name: value for name, value in sampling_options(args, OWN_SAMPLING_FLAGS).items()
                if value is not None and value != getattr(off, name)
                and not (name == "dry_sequence_breakers" and tuple(value) == off.dry_sequence_breakers)}
    SamplingParams(**sampling)  # a bad value fails here, by name, not in the first generation
    if args.peers and sampling:
        raise RequestError("--peers runs with temperature only (the peers apply other settings their own way): drop "
                           f"{', '.join('--' + k.replace('_', '-') for k in sampling)}, or --peers")
    state_before = machine_state()
    workloads = [] if args.context else prompts.load_workloads(args.workloads, args.prompts, args.max_prompts,
                                                               args.max_tokens)
    schema = _json_schema(args.json_schema)
    modes = runner.parse_modes(args.modes, args.adaptive_n_max)
    log(f"bench: loading {args.model}")
    llm = LLM(args.model, dtype=args.dtype, device=args.device, threads=args.threads or None,
              static_steps=False if args.no_cuda_graphs else None,
              generation_config=False,  # every mode under the bench's sampling settings, not the model's
              tensor_parallel=args.tensor_parallel, split_layers=args.split_layers)
    if llm.group is not None:
        llm.group.timing = True
    if args.context:
        workloads = _context_workloads(args, llm)
    free_workloads = list(workloads)  # the peers run these only: they get no grammar
    if llm.group is not None and not (args.no_costs and args.no_memory):
        log("bench: the cost model and the memory processes run on one device: skipped with --tensor-parallel / "
            "--split-layers")
        args.no_costs = args.no_memory = True
    if schema is not None:
        llm.engine.check_grammar(schema)  # compiled now: a schema xgrammar cannot use fails here, by name
        workloads += prompts.constrained_twins(workloads, schema)
    draft_model = args.spec_draft_model
    if draft_model is None and str(args.model) == "demo" and any("draft" in m.drafters for m in modes):
        draft_model = "demo-draft"
    dropped = []
    if draft_model and any("draft" in m.drafters for m in modes):
        try:
            llm.engine.draft_model(draft_model)
        except MtpxError as e:
            log(f"bench: cannot load the draft model {draft_model}: {e}")
            draft_model = None
    for m in list(modes):
        if ("mtp" in m.drafters and llm.model.mtp is None) or ("draft" in m.drafters and not draft_model):
            dropped.append(m.name)
            modes.remove(m)
    if dropped:
        log(f"bench: skipping modes {dropped} (no MTP layer / no --spec-draft-model)")
    synth = args.spec_synth_rates
    cfg = runner.BenchConfig(modes, workloads, list(args.temperature), args.repeat, synth, draft_model, args.seed,
                             not args.respect_eos, not args.no_warmup, sampling)
    log(f"bench: {len(modes)} modes × {len(workloads)} workloads × {len(cfg.temperatures)} temperatures × "
        f"{args.repeat} repeats" + (f" — {('SYNTHETIC acceptance ' + str(synth))}" if synth else ""))
    rows = runner.run_bench(llm, cfg, log)
    records = aggregate.aggregate(rows, modes, synth)
    dm = llm.engine.draft_model(draft_model) if draft_model and any("draft" in m.drafters for m in modes) else None
    costs = costs_by_context = None
    if not args.no_costs:
        log("bench: cost model")
        costs = costmodel.measure_costs(llm.model, draft_model=dm)
        costmodel.add_predictions(records, costs)
        if args.context:  # the 128-token costs do not hold where these generations decode
            from mtpx.bench import context
            costs_by_context = context.measure_context_costs(llm.model, workloads, dm, log)
            context.add_context_predictions(records, costs_by_context)
    bandwidth = None
    weights = roofline.model_weight_bytes(llm.model)
    if not args.no_roofline:
        log("bench: memory bandwidth")
        bandwidth = roofline.measure_bandwidth(device=llm.device)
        roofline.add_roofline(records, bandwidth)
    memory = None
    if not args.no_memory:
        w0 = workloads[0]
        prompt = w0.texts(llm.tokenizer)[0]
        memory = _memory(args, modes, prompt, w0.max_tokens, synth, draft_model)
    peers = []
    if args.peers:
        from mtpx.bench import peers as peers_mod
        peers = peers_mod.run_peers(args, llm, free_workloads, modes, synth, log)
    state_after = machine_state()
    meta = {
        **machine_description(),
        "machine_state": describe_state(state_before, state_after),
        "state_before": state_before, "state_after": state_after,
        "model": args.label or str(args.model), "model_path": str(llm.path),
        "model_config": {k: v for k, v in llm.config.__dict__.items() if k != "layer_types"},
        "command": "mtpx bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"]
        else " ".join(shlex.quote(a) for a in sys.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(), "torch": torch.__version__, "threads": _threads(llm),
        "device": str(llm.device), "dtype": dtype_name(llm), **cpu_kernels_meta(llm),
        "parallel": {"kind": llm.parallel.kind, "ranks": llm.parallel.world, "stages": list(llm.parallel.stages),
                     "backend": "nccl" if llm.device.type == "cuda" else "gloo",
                     "rank_weight_bytes": llm.rank_weight_bytes} if llm.group is not None else None,
        "repeat": args.repeat, "temperatures": cfg.temperatures, "sampling": sampling, "ignore_eos": cfg.ignore_eos,
        "synthetic": synth is not None, "synthetic_rates": synth, "draft_model": draft_model,
        "modes": runner.mode_dicts(modes),
        "workloads": {w.name: {"prompts": len(w.prompts), "max_tokens": w.max_tokens, "chat": w.chat,
                               "description": w.description, "json_schema": w.grammar is not None}
                      for w in workloads},
        "json_schema": {"file": args.json_schema, "schema": json.loads(schema.source)} if schema else None,
        "contexts": args.context,
    }
    llm.close()  # stops the other ranks where the model ran over several
    return {"meta": meta, "records": records, "memory": memory, "costs": costs, "costs_by_context": costs_by_context,
            "bandwidth": bandwidth,
            "weights": weights, "peers": peers, "runs": rows}


def _context_workloads(args: argparse.Namespace, llm) -> list:
    """The ctxN workloads of --context (the model's tokenizer and context needed). The memory processes take a
    text prompt, so they are skipped: the report gives each sequence's bytes instead."""
    from mtpx.bench import context, prompts
    texts = prompts.load_workload_file(Path(args.prompts)).prompts if args.prompts else None
    if not args.no_memory:
        log("bench: --context reports the memory of each sequence; the per-mode memory processes are skipped")
        args.no_memory = True
    workloads = context.context_workloads(args.context, llm.tokenizer, llm.engine.max_context, args.max_prompts,
                                          args.max_tokens, ["\n\n".join(texts)] if texts else None)
    log("bench: contexts " + ", ".join(f"{w.name} ({len(w.prompts)} prompts of {len(w.prompts[0])} tokens)"
                                       for w in workloads))
    return workloads


def _json_schema(path: str | None):
    """The GrammarSpec of --json-schema FILE, or None."""
    if not path:
        return None
    from mtpx.engine.constraints import GrammarSpec
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise RequestError(f"cannot read --json-schema {path}: {e}") from None
    return GrammarSpec.json_schema(text, "--json-schema")


def _threads(llm) -> int | str:
    """The thread count, or what the thread tuner measured (mtpx/threads.py) where it chose."""
    import torch
    tuner = llm.thread_tuner
    if tuner is None:
        return torch.get_num_threads()
    rates = ", ".join(f"{n}: {r:.0f} tok/s" for n, r in sorted(tuner.measured.items()))
    return f"tuned ({rates or 'not measured yet'} in its last complete measurement; {tuner.current} at the end)"


def _memory(args, modes, prompt, max_tokens, synth, draft_model) -> dict:
    from mtpx.bench.memory import measure_modes
    log("bench: memory (one process per mode)")
    return measure_modes(str(args.model), [m.name for m in modes], prompt, max_tokens, dtype=args.dtype,
                         device=None if args.device == "auto" else args.device, synth_rates=synth,
                         draft_model=draft_model, adaptive_n_max=args.adaptive_n_max, threads=args.threads, log=log)


def main(args: argparse.Namespace) -> int:
    if args.subcommand == "gen-checkpoint":
        from mtpx.bench import gen_checkpoint
        return gen_checkpoint.main(args)
    if args.subcommand == "cache-size":
        from mtpx.bench import cache_size
        return cache_size.main(args)
    if args.subcommand == "report":
        result = json.loads((args.dir / "results.json").read_text())
        for p in render(result, args.dir):
            print(p)
        return 0
    result = run(args)
    paths = render(result, args.out, not args.no_plots)
    print((args.out / "results.md").read_text())
    log("bench: wrote " + ", ".join(str(p) for p in paths))
    return 0
