"""Peers on the same checkpoint, prompts (as token ids) and lengths (optional extras: `pip install mtpx[peers]`).

- Hugging Face transformers `generate()`: plain decoding, and `prompt_lookup_num_tokens` (assisted generation; for
  this model family transformers refuses it — the refusal is recorded as the result).
- llama.cpp through its HTTP server (`llama-server`, built from the llama-cpp-python sdist's vendored llama.cpp):
  plain, and MTP with `--spec-type draft-mtp --spec-draft-n-max K`, on a GGUF of the same weights written by
  `mtpx convert`. One server per mode, requests round-robin across them, so modes are measured side by side.

Synthetic acceptance: mtpx's `--spec-synth-rates` are conditional per position (position i is accepted with P_i
given positions < i were); llama.cpp's are unconditional (position i is accepted with probability P_i overall, and
must not increase). The llama.cpp server is given the cumulative products of mtpx's rates, so both engines accept
the same number of drafts with the same probabilities.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from mtpx.errors import RequestError


def llamacpp_synth_rates(conditional: list[float], k: int) -> list[float]:
    """mtpx's conditional per-position rates -> llama.cpp's unconditional ones (cumulative products), k values."""
    out, run = [], 1.0
    for i in range(k):
        run *= conditional[min(i, len(conditional) - 1)]
        out.append(run)
    return out


def _summary(engine: str, mode: str, workload: str, temperature: float, samples: list[dict], synthetic: bool,
             note: str = "", **extra) -> dict:
    """samples: per repeat {decode_tokens, decode_s, prompt_tokens, prefill_s, drafted, accepted, drafts}."""
    by_rep = {}
    for s in samples:
        r = by_rep.setdefault(s["repeat"], {"dt": 0, "ds": 0.0, "pt": 0, "ps": 0.0})
        r["dt"] += s["decode_tokens"]
        r["ds"] += s["decode_s"]
        r["pt"] += s["prompt_tokens"]
        r["ps"] += s["prefill_s"]
    tps = [r["dt"] / r["ds"] for r in by_rep.values() if r["ds"] > 0]
    pps = [r["pt"] / r["ps"] for r in by_rep.values() if r["ps"] > 0]
    drafted = sum(s.get("drafted", 0) for s in samples)
    accepted = sum(s.get("accepted", 0) for s in samples)
    drafts = sum(s.get("drafts", 0) for s in samples)
    return {"engine": engine, "mode": mode, "workload": workload, "temperature": temperature, "synthetic": synthetic,
            "generations": len(samples), "repeats": len(by_rep),
            "decode_tokens_per_s": statistics.median(tps) if tps else None,
            "decode_tokens_per_s_min": min(tps) if tps else None,
            "decode_tokens_per_s_by_repeat": tps,
            "prefill_tokens_per_s": statistics.median(pps) if pps else None,
            "acceptance_rate": accepted / drafted if drafted else None,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
            "generated_tokens_mean": statistics.mean(s["decode_tokens"] + 1 for s in samples) if samples else None,
            "note": note, **extra}


# ------------------------------------------------------------------------------------------------ transformers

def run_hf(model_path: str, prompts: dict[str, tuple[list[list[int]], int]], temperatures: list[float], repeat: int,
           log=print) -> list[dict]:
    """transformers generate(), bf16 on CPU. prompts: workload -> (token id lists, max_tokens)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).eval()
    note = f"transformers {transformers.__version__}, bf16"
    results = []

    def gen(ids, n, temperature, **kw):
        inp = torch.tensor([ids])
        sample = temperature > 0
        args = dict(max_new_tokens=n, min_new_tokens=n, do_sample=sample, pad_token_id=0, **kw)
        if sample:
            args.update(temperature=temperature, top_k=0, top_p=1.0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(inp, **args)
        return time.perf_counter() - t0, out.shape[1] - inp.shape[1]

    first = next(iter(prompts.values()))[0][0]
    gen(first, 4, 0.0)  # warm-up
    for w, (id_lists, max_tokens) in prompts.items():
        for t in temperatures:
            samples = []
            for rep in range(repeat):
                for ids in id_lists:
                    t_first, _ = gen(ids, 1, t)
                    t_all, n = gen(ids, max_tokens, t)
                    samples.append({"repeat": rep, "decode_tokens": n - 1, "decode_s": t_all - t_first,
                                    "prompt_tokens": len(ids), "prefill_s": t_first})
            results.append(_summary("transformers", "none", w, t, samples, False, note + "; decode: (time of an "
                                    "n-token generate − time of a 1-token one) / (n − 1)"))
            log(f"bench: transformers {w} T={t:g}: {results[-1]['decode_tokens_per_s']:.1f} tok/s")
        try:  # assisted generation by prompt lookup
            gen(id_lists[0], 8, 0.0, prompt_lookup_num_tokens=3)
            results.append(_summary("transformers", "prompt_lookup(3)", w, 0.0, [], False,
                                    "ran (no refusal) — not timed"))
        except Exception as e:  # noqa: BLE001 - the refusal itself is the result
            msg = " ".join(str(e).split())[:200]
            results.append(_summary("transformers", "prompt_lookup(3)", w, 0.0, [], False, f"refused: {msg}"))
            log(f"bench: transformers prompt lookup refused: {msg}")
    return results


# ------------------------------------------------------------------------------------------------ llama.cpp

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, binary: str, gguf: str, args: list[str], threads: int, ctx: int, log=print):
        self.port = _free_port()
        self.cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(self.port), "-t", str(threads),
                    "-tb", str(threads), "-c", str(ctx), "-np", "1", "--no-webui", *args]
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"mtpx-llama-server-{self.port}.log"
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RequestError(f"llama-server exited ({self.proc.returncode}): "
                                   f"{self.log_path.read_text()[-1500:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.close()
        raise RequestError("llama-server did not become ready in 300 s")

    def complete(self, ids: list[int], n: int, temperature: float, seed: int) -> dict:
        body = {"prompt": ids, "n_predict": n, "temperature": temperature, "ignore_eos": True,
                "cache_prompt": False, "seed": seed, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "stream": False}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            return json.loads(r.read())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def llamacpp_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
        return " ".join((out.stdout + out.stderr).split())[:160]
    except (OSError, subprocess.SubprocessError):
        return "?"


def run_llamacpp(binary: str, gguf: str, prompts: dict[str, tuple[list[list[int]], int]], temperatures: list[float],
                 repeat: int, modes: list[tuple[str, int]], synth: list[float] | None, threads: int,
                 seed: int = 0, log=print) -> list[dict]:
    """modes: (name, k) with k = 0 for plain decoding and k > 0 for MTP with k drafts."""
    ctx = max(len(ids) + n for id_lists, n in prompts.values() for ids in id_lists) + 64
    servers = {}
    rates = {}
    version = llamacpp_version(binary)
    try:
        for name, k in modes:
            args = []
            if k:
                args = ["--spec-type", "draft-mtp", "--spec-draft-n-max", str(k)]
                if synth:
                    rates[name] = llamacpp_synth_rates(synth, k)
                    args += ["--spec-synth-rates", ",".join(f"{r:.6g}" for r in rates[name])]
            servers[name] = LlamaServer(binary, gguf, args, threads, ctx, log)
            log(f"bench: llama-server {name} ready ({' '.join(args) or 'plain'})")
        first = next(iter(prompts.values()))[0][0]
        for s in servers.values():
            s.complete(first, 8, 0.0, seed)  # warm-up
        samples: dict[tuple, list[dict]] = {}
        names = list(servers)
        for w, (id_lists, max_tokens) in prompts.items():
            for t in temperatures:
                for rep in range(repeat):
                    for i, ids in enumerate(id_lists):
                        order = names[i % len(names):] + names[:i % len(names)]
                        for name in order:
                            tm = servers[name].complete(ids, max_tokens, t, seed + 100003 * rep + i)["timings"]
                            samples.setdefault((name, w, t), []).append({
                                "repeat": rep, "decode_tokens": tm["predicted_n"], "decode_s": tm["predicted_ms"] / 1000,
                                "prompt_tokens": tm["prompt_n"], "prefill_s": tm["prompt_ms"] / 1000,
                                "drafted": tm.get("draft_n", 0), "accepted": tm.get("draft_n_accepted", 0),
                                # rounds: the first token comes from the prompt, then each round emits accepted + 1
                                "drafts": tm["predicted_n"] - 1 - tm.get("draft_n_accepted", 0)
                                if tm.get("draft_n") else 0})
                log(f"bench: llama.cpp {w} T={t:g} done")
    finally:
        for s in servers.values():
            s.close()
    results = []
    for (name, w, t), ss in samples.items():
        k = dict(modes)[name]
        synthetic = bool(synth) and k > 0
        note = "llama-server, predicted_n / predicted_ms"
        if k:
            note += "; rounds inferred as predicted_n − 1 − accepted"
        if synthetic:
            note += f"; --spec-synth-rates {','.join(f'{r:.6g}' for r in rates[name])} (llama.cpp's unconditional form)"
        results.append(_summary("llama.cpp", name, w, t, ss, synthetic, note, version=version,
                                synthetic_rates=synth if synthetic else None,
                                llamacpp_synth_rates=rates.get(name)))
    return results


# ------------------------------------------------------------------------------------------------ entry point

def run_peers(args, llm, workloads, modes, synth, log=print) -> list[dict]:
    prompts = {}
    n_prompts = getattr(args, "peer_max_prompts", None)
    for w in workloads:
        ids = [llm.encode_prompt(t) for t in w.texts(llm.tokenizer)]
        prompts[w.name] = (ids[:n_prompts] if n_prompts else ids, w.max_tokens)
    results = []
    temps = list(args.temperature)
    threads = args.threads or len(__import__("os").sched_getaffinity(0))  # all cores, as the peers default to
    for peer in args.peers:
        if peer == "hf":
            try:
                results += run_hf(str(llm.path), prompts, temps, args.repeat, log)
            except ImportError as e:
                log(f"bench: transformers not installed ({e}); skipping (pip install mtpx[peers])")
        elif peer == "llamacpp":
            binary = args.llama_server or shutil.which("llama-server")
            if not binary:
                log("bench: no llama-server found (give --llama-server PATH); skipping llama.cpp")
                continue
            gguf = args.gguf
            if not gguf:
                from mtpx.loading.checkpoint import load_checkpoint
                from mtpx.loading.convert import write_gguf
                gguf = str(Path(args.out) / "model-bf16.gguf")
                if not Path(gguf).exists():
                    log(f"bench: converting {llm.path} to {gguf}")
                    Path(args.out).mkdir(parents=True, exist_ok=True)
                    write_gguf(load_checkpoint(llm.path), Path(gguf), "bf16", with_mtp=True)
            peer_modes = args.peer_modes or (["none"] + [m.name for m in modes
                                                         if m.spec_type == "mtp" and m.policy == "fixed"])
            mlist = []
            for name in peer_modes:
                if name == "none":
                    mlist.append(("none", 0))
                elif name.startswith("mtp") and name[3:].isdigit():
                    mlist.append((name, int(name[3:])))
                else:
                    log(f"bench: llama.cpp mode {name!r} not supported here (none, mtpK); skipped")
            results += run_llamacpp(binary, gguf, prompts, temps, args.repeat, mlist, synth, threads, args.seed, log)
        else:
            log(f"bench: unknown peer {peer!r} (hf, llamacpp)")
    # speedups within each engine, against its own plain decoding
    for r in results:
        base = next((b for b in results if b["engine"] == r["engine"] and b["mode"] == "none"
                     and b["workload"] == r["workload"] and b["temperature"] == r["temperature"]), None)
        if base and base.get("decode_tokens_per_s") and r.get("decode_tokens_per_s"):
            r["speedup"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return results
