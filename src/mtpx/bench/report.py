"""Benchmark output: `results.json`, `results.md` (markdown tables) and PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

import json
from pathlib import Path

MiB = 2**20


def synthetic_label(rates) -> str:
    return f"SYNTHETIC acceptance (per-position rates {','.join(f'{r:g}' for r in rates)})" if rates else ""


def write_json(result: dict, out: Path) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


def _f(x, fmt=".1f", none="–") -> str:
    if x is None:
        return none
    return format(x, fmt)


def _temp_label(t: float) -> str:
    return "greedy (T=0)" if t == 0 else f"T={t:g}"


def records_table(records: list[dict], memory: dict | None = None) -> str:
    """One markdown table per temperature: a row per (workload, mode)."""
    memory = memory or {}
    lines = []
    temps = list(dict.fromkeys(r["temperature"] for r in records))
    for t in temps:
        rs = [r for r in records if r["temperature"] == t]
        synth = next((r["synthetic_rates"] for r in rs if r["synthetic"]), None)
        title = f"#### {_temp_label(t)}" + (f" — {synthetic_label(synth)}" if synth else "")
        lines += [title, "",
                  "| workload | mode | synthetic | decode tok/s median (min) | speedup × median (min) | "
                  "predicted × §4 / refined | prefill tok/s | prefill incl. drafter (ratio to none) | TTFT ms | "
                  "acceptance | by position | mean acc. len | extra peak MiB | weights GB/s (% of roof) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            spec = r["spec_type"] != "none"
            mem = memory.get(r["mode"], {})
            extra = mem.get("extra_peak_bytes")
            bw = (f"{_f(r.get('achieved_GBps'))} ({_f(100 * r['bandwidth_fraction'], '.0f')}%)"
                  if r.get("bandwidth_fraction") is not None else "–")
            lines.append(
                f"| {r['workload']} | {r['mode']} | {'yes' if r['synthetic'] else 'no'} | "
                f"{_f(r['decode_tokens_per_s'])} ({_f(r['decode_tokens_per_s_min'])}) | "
                f"{_f(r['speedup'], '.2f')} ({_f(r['speedup_min'], '.2f')}) | "
                f"{_f(r.get('predicted_speedup'), '.2f')} / {_f(r.get('predicted_speedup_refined'), '.2f')} | "
                f"{_f(r['prefill_tokens_per_s'], '.0f')} | "
                f"{_f(r['prefill_with_drafter_tokens_per_s'], '.0f')} ({_f(r['prefill_with_drafter_ratio'], '.2f')}) | "
                f"{_f(1000 * r['time_to_first_token_s'])} | "
                f"{_f(100 * r['acceptance_rate'], '.1f') + '%' if spec else '–'} | "
                f"{' '.join(f'{a:.2f}' for a in r['acceptance_by_position']) if spec else '–'} | "
                f"{_f(r['mean_acceptance_length'], '.2f') if spec else '–'} | "
                f"{_f(extra / MiB) if extra is not None and spec else '–'} | {bw} |")
        lines.append("")
    return "\n".join(lines)


def schema_table(records: list[dict], suffix: str = "+json") -> str:
    """Each speculative mode on each workload, free and under --json-schema (the NAME+json twin), side by side."""
    lines = ["| T | workload | mode | × plain | × plain, schema | acceptance | acceptance, schema | mean acc. len | "
             "mean acc. len, schema | decode tok/s | decode tok/s, schema |", "|---" * 11 + "|"]
    by_key = {(r["temperature"], r["workload"], r["mode"]): r for r in records}
    for (t, w, m), r in by_key.items():
        c = by_key.get((t, w + suffix, m))
        if c is None:
            continue
        spec = r["spec_type"] != "none"
        lines.append(f"| {t:g} | {w} | {m} | {_f(r['speedup'], '.2f')} | {_f(c['speedup'], '.2f')} | "
                     f"{_f(100 * r['acceptance_rate'], '.1f') + '%' if spec else '–'} | "
                     f"{_f(100 * c['acceptance_rate'], '.1f') + '%' if spec else '–'} | "
                     f"{_f(r['mean_acceptance_length'], '.2f') if spec else '–'} | "
                     f"{_f(c['mean_acceptance_length'], '.2f') if spec else '–'} | "
                     f"{_f(r['decode_tokens_per_s'], '.0f')} | {_f(c['decode_tokens_per_s'], '.0f')} |")
    return "\n".join(lines)


def cost_table(costs: dict) -> str:
    lines = ["| quantity | value |", "|---|---|",
             f"| context before the measured steps | {costs['context_tokens']} tokens |",
             f"| plain decode step (1 row + lm_head) | {1000 * costs['plain_step_s']:.2f} ms |"]
    for k, rel in sorted(((int(k), v) for k, v in costs["verify_rel"].items())):
        if k >= 1:
            lines.append(f"| verify k={k} ({k + 1} rows) / plain step | {rel:.3f} |")
    if "c_mtp" in costs:
        lines.append(f"| MTP draft step (MTP layer + lm_head, 1 row) | {1000 * costs['mtp_step_s']:.2f} ms, "
                     f"c = {costs['c_mtp']:.3f} |")
        lines.append(f"| MTP pass over the prompt / main prefill | {costs['mtp_prefill_rel']:.3f} |")
    if "c_mtp_chain" in costs:
        lines.append(f"| MTP greedy draft chain (3 drafts, full lm_head, one call), per draft | "
                     f"{1000 * costs['mtp_chain_draft_s']:.2f} ms, c = {costs['c_mtp_chain']:.3f} |")
    if "c_draft_model" in costs:
        lines.append(f"| draft-model step (1 row + lm_head) | {1000 * costs['draft_model_step_s']:.2f} ms, "
                     f"c = {costs['c_draft_model']:.3f} |")
    lines.append(f"| prefill of {costs['context_tokens']} tokens | {costs['prefill_tokens_per_s']:.0f} tok/s |")
    return "\n".join(lines)


def bandwidth_table(bw: dict, weights: dict | None) -> str:
    lines = ["| measurement | GB/s |", "|---|---|",
             f"| copy, {bw['buffer_bytes'] / MiB:.0f} MiB fp32 (read + write counted) | {bw['copy_GBps']:.1f} |",
             f"| sum, {bw['buffer_bytes'] / MiB:.0f} MiB fp32 (read) — the roof used below | {bw['read_GBps']:.1f} |",
             f"| bf16 F.linear, 1 row, weights streamed | {bw['linear_bf16_GBps']:.1f} |"]
    if "linear_bf16_packed_GBps" in bw:
        lines.append(f"| bf16 oneDNN-prepacked linear, 5 rows | {bw['linear_bf16_packed_GBps']:.1f} |")
    for rows in (1, 5):
        if f"step_linear_{rows}_rows_GBps" in bw:
            lines.append(f"| bf16 step matmul ({bw.get('step_kernel', '?')}), {rows} row{'s' * (rows > 1)}, weights "
                         f"streamed | {bw[f'step_linear_{rows}_rows_GBps']:.1f} |")
    if weights:
        lines += ["", "| weights | MiB |", "|---|---|",
                  f"| all parameters ({weights['parameters'] / 1e6:.0f}M) | {weights['total'] / MiB:.1f} |",
                  f"| read per decode step: main layers (dense part) | {weights['main_dense'] / MiB:.1f} |",
                  f"| read per decode step: lm_head | {weights['lm_head'] / MiB:.1f} |",
                  f"| MTP layer (dense part) | {weights['mtp_dense'] / MiB:.1f} |"]
        if weights.get("per_expert"):
            lines.append(f"| one routed expert | {weights['per_expert'] / MiB:.2f} |")
    return "\n".join(lines)


def memory_table(memory: dict) -> str:
    lines = ["| mode | footprint MiB | extra over none MiB | drafter_memory_bytes stat MiB (weights + cache) | "
             "extra / stat |", "|---|---|---|---|---|"]
    for name, m in memory.items():
        stat = m.get("drafter_memory_bytes", 0)
        extra = m.get("extra_peak_bytes")
        lines.append(f"| {name} | {m['footprint_bytes'] / MiB:.1f} | {_f(extra / MiB if extra is not None else None)} | "
                     f"{stat / MiB:.1f} | {_f(extra / stat if stat and extra is not None else None, '.2f')} |")
    return "\n".join(lines)


def peers_table(peers: list[dict], records: list[dict] | None = None) -> str:
    """mtpx beside its peers: per workload and temperature, mtpx's rows for the modes the peers ran, then theirs."""
    lines = ["| workload | T | engine | mode | synthetic | decode tok/s median (min) | speedup × | prefill tok/s | "
             "acceptance | mean acc. len | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((p["workload"], p["temperature"]) for p in peers))
    peer_modes = {p["mode"] for p in peers}
    for w, t in keys:
        rows = [dict(r, engine="mtpx", note="") for r in records or []
                if r["workload"] == w and r["temperature"] == t and r["mode"] in peer_modes]
        rows += [p for p in peers if p["workload"] == w and p["temperature"] == t]
        for p in rows:
            acc = p.get("acceptance_rate") if p["mode"] != "none" else None
            mal = p.get("mean_acceptance_length") if p["mode"] != "none" else None
            lines.append(f"| {w} | {t:g} | {p['engine']} | {p['mode']} | {'yes' if p.get('synthetic') else 'no'} | "
                         f"{_f(p.get('decode_tokens_per_s'))} ({_f(p.get('decode_tokens_per_s_min'))}) | "
                         f"{_f(p.get('speedup'), '.2f')} | {_f(p.get('prefill_tokens_per_s'), '.0f')} | "
                         f"{_f(100 * acc, '.1f') + '%' if acc is not None else '–'} | {_f(mal, '.2f')} | "
                         f"{p.get('note', '')} |")
    return "\n".join(lines)


def parallel_table(records: list[dict], parallel: dict) -> str:
    """Per mode over several ranks: a decode round's time, the part of it in collectives, what they moved, and the
    weights each rank reads per main-model pass."""
    per_rank = ", ".join(f"{b / MiB:.1f}" for b in parallel.get("rank_weight_bytes") or [])
    lines = [f"{parallel['kind']} over {parallel['ranks']} ranks ({parallel['backend']}); each rank reads "
             f"{per_rank} MiB of weights per main-model pass (rank 0 first).", "",
             "| workload | T | mode | decode tok/s | round ms | collectives ms / round | share | KiB moved / round |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("rounds"):
            share = r["collective_s_per_round"] / r["round_s"] if r["round_s"] else None
            lines.append(f"| {r['workload']} | {_temp_label(r['temperature'])} | {r['mode']} | "
                         f"{_f(r['decode_tokens_per_s'])} | {_f(1000 * r['round_s'], '.2f')} | "
                         f"{_f(1000 * r['collective_s_per_round'], '.2f')} | {_f(100 * share if share is not None else None, '.0f')}% | "
                         f"{_f(r['collective_bytes_per_round'] / 1024)} |")
    return "\n".join(lines)


def _isa(meta: dict) -> str:
    """' (kernels avx2)', or ' (kernels avx2, integer dots on VNNI)', where the report records the CPU kernels'
    instruction set, else nothing."""
    if not meta.get("cpu_isa"):
        return ""
    return f" (kernels {meta['cpu_isa']}{', integer dots on VNNI' if meta.get('int_dot_vnni') else ''})"


def write_markdown(result: dict, out: Path) -> Path:
    meta = result["meta"]
    parts = [f"# mtpx bench: {meta['model']}", "",
             f"Machine: {meta['machine']}. {meta.get('machine_state', '')}", "",
             f"Command: `{meta['command']}`", "",
             f"mtpx {meta.get('git_commit', '?')}, torch {meta['torch']}, threads {meta['threads']}, device "
             f"{meta['device']}{_isa(meta)}, dtype {meta['dtype']}; {meta['repeat']} repeat(s), modes interleaved per prompt; "
             f"throughput = total decoded tokens / total decode time per repeat; min and median over repeats.", ""]
    settings = meta.get("sampling") or meta.get("penalties")  # "penalties": this session's first reports
    if settings:
        parts += ["Sampling settings in every generation: " + ", ".join(f"{k} {v}" for k, v in settings.items())
                  + ".", ""]
    if meta.get("synthetic_rates"):
        parts += [f"**{synthetic_label(meta['synthetic_rates'])}**: drafted tokens are accepted by coin flips "
                  "(position i accepted with the i-th rate, given the earlier ones were), not by comparison with "
                  "the target model; the generated text is not the model's output.", ""]
    if meta.get("json_schema"):
        parts += [f"Workloads named NAME+json: every output constrained to the JSON schema of "
                  f"`{meta['json_schema']['file']}` and ending with it; their speedups are over plain decoding under "
                  "the same schema.", ""]
    parts += ["### Speed and acceptance", "", records_table(result["records"], result.get("memory"))]
    if meta.get("parallel"):
        parts += ["", "### Over several ranks", "", parallel_table(result["records"], meta["parallel"]), ""]
    if meta.get("contexts"):
        from mtpx.bench.context import context_table
        parts += ["### Long contexts", "", context_table(result["records"], result.get("costs_by_context")), ""]
    if meta.get("json_schema"):
        parts += ["### MTP with and without the JSON schema", "", schema_table(result["records"]), ""]
    if result.get("memory"):
        parts += ["### Extra peak memory of the drafter (fresh process per mode)", "", memory_table(result["memory"]), ""]
    if result.get("costs"):
        parts += ["### Cost model", "", cost_table(result["costs"]), ""]
    if result.get("bandwidth"):
        parts += ["### Roofline", "", bandwidth_table(result["bandwidth"], result.get("weights")), ""]
    if result.get("peers"):
        parts += ["### Peers (same prompts as token ids, same lengths)", "", peers_table(result["peers"], result["records"]), ""]
    path = out / "results.md"
    path.write_text("\n".join(parts))
    return path


def write_plots(result: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = result["records"]
    synth = result["meta"].get("synthetic_rates")
    tag = f"\n{synthetic_label(synth)}" if synth else ""
    model = result["meta"]["model"]
    paths = []
    temps = list(dict.fromkeys(r["temperature"] for r in records))
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    modes = list(dict.fromkeys(r["mode"] for r in records))
    color = {m: f"C{i % 10}" for i, m in enumerate(modes)}

    # 1. decode tok/s by mode and workload
    fig, axes = plt.subplots(1, len(temps), figsize=(max(6, 2.2 * len(workloads) * len(modes) / 3) * len(temps) / 1.5,
                                                     4.5), squeeze=False)
    width = 0.8 / max(1, len(modes))
    for ax, t in zip(axes[0], temps):
        for j, m in enumerate(modes):
            xs, ys, lo, hi = [], [], [], []
            for i, w in enumerate(workloads):
                r = next((r for r in records if r["temperature"] == t and r["workload"] == w and r["mode"] == m), None)
                if r is None:
                    continue
                xs.append(i + (j - (len(modes) - 1) / 2) * width)
                ys.append(r["decode_tokens_per_s"])
                lo.append(r["decode_tokens_per_s"] - r["decode_tokens_per_s_min"])
                hi.append(r["decode_tokens_per_s_max"] - r["decode_tokens_per_s"])
            ax.bar(xs, ys, width, yerr=[lo, hi], label=m, capsize=2, color=color[m])
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_ylabel("decode tokens/s (median, min–max)")
        ax.set_title(_temp_label(t))
    axes[0][0].legend(fontsize=8, ncol=2)
    fig.suptitle(f"mtpx decode speed — {model}{tag}", fontsize=10)
    fig.tight_layout()
    paths.append(out / "tokens_per_s.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 2. acceptance by position
    spec = [m for m in modes if any(r["mode"] == m and r["spec_type"] != "none" and r["acceptance_by_position"]
                                    for r in records)]
    if spec:
        fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 3.8), squeeze=False, sharey=True)
        styles = ["-", "--", ":", "-."]
        for ax, w in zip(axes[0], workloads):
            for ti, t in enumerate(temps):
                for j, m in enumerate(spec):
                    r = next((r for r in records if r["temperature"] == t and r["workload"] == w and r["mode"] == m),
                             None)
                    if r is None or not r["acceptance_by_position"]:
                        continue
                    pos = range(1, len(r["acceptance_by_position"]) + 1)
                    ax.plot(pos, r["acceptance_by_position"], styles[ti % len(styles)], marker="o", color=color[m],
                            label=f"{m} {_temp_label(t)}")
            ax.set_title(w)
            ax.set_xlabel("draft position")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_ylim(0, 1.02)
        axes[0][0].set_ylabel("fraction accepted")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"acceptance by position — {model}{tag}", fontsize=10)
        fig.tight_layout()
        paths.append(out / "acceptance_by_position.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # 3. measured vs predicted speedup
    pred = [r for r in records if r.get("predicted_speedup") is not None]
    if pred:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        top = max(max(r["speedup"] for r in pred), max(r["predicted_speedup"] for r in pred),
                  max(r["predicted_speedup_refined"] or 0 for r in pred)) * 1.1
        ax.plot([0, top], [0, top], color="grey", lw=0.8)
        markers = {w: mk for w, mk in zip(workloads, "osD^v<>")}
        for r in pred:
            c = color[r["mode"]]
            ax.scatter(r["predicted_speedup"], r["speedup"], marker=markers[r["workload"]],
                       facecolors="none" if r["temperature"] else c, edgecolors=c)
            if r["predicted_speedup_refined"] is not None:
                ax.scatter(r["predicted_speedup_refined"], r["speedup"], marker=markers[r["workload"]], color=c,
                           alpha=0.3)
        for m in modes:
            if any(r["mode"] == m for r in pred):
                ax.scatter([], [], color=color[m], label=m)
        for w, mk in markers.items():
            ax.scatter([], [], marker=mk, color="black", label=w)
        ax.set_xlabel("predicted speedup\n(REFERENCE §4; faint: with measured verify cost\nand mean acceptance length)",
                      fontsize=8)
        ax.set_ylabel("measured speedup over none")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.legend(fontsize=7)
        ax.set_title(f"measured vs predicted speedup — {model}{tag}\n(hollow: sampling, filled: greedy)", fontsize=9)
        fig.tight_layout()
        paths.append(out / "speedup_measured_vs_predicted.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # 4. mtpx beside its peers
    peers = [p for p in result.get("peers") or [] if p.get("decode_tokens_per_s")]
    if peers:
        keys = list(dict.fromkeys((p["workload"], p["temperature"]) for p in peers))
        pmodes = {p["mode"] for p in peers}
        fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
        for ax, (w, t) in zip(axes[0], keys):
            rows = [("mtpx", r["mode"], r) for r in records
                    if r["workload"] == w and r["temperature"] == t and r["mode"] in pmodes]
            rows += [(p["engine"], p["mode"], p) for p in peers if p["workload"] == w and p["temperature"] == t]
            labels = [f"{e}\n{m}" + ("\n(synthetic)" if r.get("synthetic") else "") for e, m, r in rows]
            vals = [r["decode_tokens_per_s"] for _, _, r in rows]
            engines = list(dict.fromkeys(e for e, _, _ in rows))
            ax.bar(range(len(rows)), vals, color=[f"C{engines.index(e)}" for e, _, _ in rows])
            for i, v in enumerate(vals):
                ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(rows)), labels, fontsize=7)
            ax.set_ylabel("decode tokens/s")
            ax.set_title(f"{w}, {_temp_label(t)}", fontsize=9)
        fig.suptitle(f"mtpx and peers — {model}{tag}", fontsize=10)
        fig.tight_layout()
        paths.append(out / "peers.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
