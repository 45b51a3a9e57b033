"""Extra peak memory of each drafter, measured in a fresh process per mode.

A process loads the model (dropping the MTP layer when the mode does not use it, so that its weights count as the
MTP drafter's memory), then generates once while a thread samples its resident set size (CPU) or reads the CUDA
allocator's peak. footprint = peak − resident size before loading anything; extra = footprint(mode) −
footprint(none). A separate process per mode keeps one mode's freed memory from hiding the next one's.

Run as `python -m mtpx.bench.memory --model M --mode mtp3 --prompt TEXT --max-tokens N` (prints one JSON line).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:  # not Linux: peak RSS so far (ru_maxrss is KiB on Linux, bytes on macOS)
        import resource
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024


class PeakSampler:
    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class SequenceBytes:
    """What each generation's sequence holds when it ends: `last` = {cache_bytes: the main model's caches
    (SequenceState.nbytes()), drafter_sequence_bytes: its drafter's own (Drafter.sequence_bytes)}. While attached it
    wraps the engine's drafter factory (to know the generation's drafter) and its release of a finished sequence."""

    def __init__(self, engine) -> None:
        self.engine, self.drafter, self.last = engine, None, {}
        # a wrapper already there (runner.DrafterPrefillTimer) is put back on restore, not dropped
        self.saved = {name: engine.__dict__.get(name) for name in ("drafter", "release")}
        make, release = engine.drafter, engine.release

        def drafter(*args, **kwargs):
            self.drafter = make(*args, **kwargs)
            return self.drafter

        def release_seq(seq) -> None:
            self.last = {"cache_bytes": seq.state.nbytes(),
                         "drafter_sequence_bytes": self.drafter.sequence_bytes(seq) if self.drafter else 0}
            release(seq)
        engine.drafter, engine.release = drafter, release_seq

    def restore(self) -> None:
        for name, value in self.saved.items():
            if value is None:
                delattr(self.engine, name)
            else:
                setattr(self.engine, name, value)


def measure(args: argparse.Namespace) -> dict:
    import torch

    from mtpx.bench.runner import BenchConfig, generation_kwargs, parse_mode
    from mtpx.llm import LLM
    torch.set_num_threads(args.threads or torch.get_num_threads())
    mode = parse_mode(args.mode, args.adaptive_n_max)
    gc.collect()
    base_rss = rss_bytes()
    base_cuda = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    llm = LLM(args.model, dtype=args.dtype, device=args.device, threads=args.threads or None,
              generation_config=False)  # measured under the bench's own sampling settings
    cuda = llm.device.type == "cuda"
    base = base_cuda if cuda else base_rss
    if "mtp" not in mode.drafters and llm.model.mtp is not None:
        llm.model.mtp = None
        gc.collect()
    synth = [float(x) for x in args.spec_synth_rates.split(",")] if args.spec_synth_rates else None
    cfg = BenchConfig([mode], [], [args.temperature], synth_rates=synth, draft_model=args.spec_draft_model)
    kw = generation_kwargs(mode, cfg, args.temperature, args.max_tokens, 0)
    prompt = args.prompt
    loaded = torch.cuda.memory_allocated() if cuda else rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        completion = llm.generate(prompt, **kw)
        peak = torch.cuda.max_memory_allocated()
    else:
        with PeakSampler() as sampler:
            completion = llm.generate(prompt, **kw)
        peak = sampler.peak
    return {"mode": mode.name, "device": "cuda" if cuda else "cpu", "base_bytes": base, "loaded_bytes": loaded,
            "peak_bytes": peak, "footprint_bytes": peak - base,
            "drafter_memory_bytes": completion.stats["drafter_memory_bytes"],
            "generated_tokens": completion.stats["generated_tokens"]}


def measure_modes(model: str, modes: list[str], prompt: str, max_tokens: int, *, dtype: str | None = None,
                  device: str | None = None, temperature: float = 0.0, synth_rates: list[float] | None = None,
                  draft_model: str | None = None, adaptive_n_max: int = 4, threads: int = 0,
                  log=print) -> dict[str, dict]:
    """Run `measure` in a fresh interpreter per mode; adds `extra_peak_bytes` relative to mode none."""
    out: dict[str, dict] = {}
    names = ["none"] + [m for m in modes if m != "none"]
    for name in names:
        cmd = [sys.executable, "-m", "mtpx.bench.memory", "--model", str(model), "--mode", name, "--prompt", prompt,
               "--max-tokens", str(max_tokens), "--temperature", str(temperature),
               "--adaptive-n-max", str(adaptive_n_max), "--threads", str(threads)]
        if dtype:
            cmd += ["--dtype", dtype]
        if device:
            cmd += ["--device", device]
        if synth_rates:
            cmd += ["--spec-synth-rates", ",".join(map(str, synth_rates))]
        if draft_model:
            cmd += ["--spec-draft-model", str(draft_model)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log(f"bench: memory measurement of mode {name} failed: {proc.stderr.strip()[-500:]}")
            continue
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"bench: memory {name}: footprint {out[name]['footprint_bytes'] / 2**20:.1f} MiB")
    if "none" in out:
        for name, m in out.items():
            m["extra_peak_bytes"] = m["footprint_bytes"] - out["none"]["footprint_bytes"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m mtpx.bench.memory")
    p.add_argument("--model", required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--spec-synth-rates", default=None)
    p.add_argument("--spec-draft-model", default=None)
    p.add_argument("--adaptive-n-max", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    print(json.dumps(measure(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
