"""Check the figures in the docs' tables against the committed bench reports they cite.

    python -m mtpx.bench.docs_check            # BENCHMARKS.md (every table) and models/demo/README.md
    python -m mtpx.bench.docs_check --write    # rewrite the cells that disagree with the reports
    python -m mtpx.bench.docs_check FILE ...   # other files; --strict: every table there must cite a report

Longer than 400 lines because every column a report can back (METRICS) is read here, beside the markdown reader.

The rules, for a markdown table:
- it cites a report with a line ``Report: `PATH` `` between its section's heading and the table (the last such line
  counts), PATH a JSON report under the repository (a directory means its `results.json`); a `report` column
  overrides it row by row (paths relative to the repository root or to `docs/bench/`);
- for a report written by `mtpx bench` (it has `meta`), the section above the table must quote the machine the report
  names (`meta.machine`, verbatim) and, in a code block, the command it records (`meta.command`; `--out DIR`,
  line continuations and `ENV=value` prefixes aside). For a `scripts/cuda_check.py` report the GPU's name
  (`device`) must appear;
- key columns pick the measurement: `workload`, `mode`, `T`, `engine` (`mtpx` or `llama.cpp`) for a bench record or a
  peer's, `mode` for memory, `k` for the cost model, `positions` for cuda_check's step times, `shape` for
  `mtpx bench cache-size`; label columns
  (`decoding`, `kernel`, `weights`, `note`) are free text;
- every other column is a metric (METRICS below): the cell must equal the report's value rounded to the decimals the
  cell shows (at least the metric's minimum), or be `–` where the report has none. Ratios are taken within one report,
  never across two.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

MiB = 2 ** 20
KEYS = {"workload", "mode", "t", "engine", "k", "positions", "shape", "report"}
LABELS = {"decoding", "kernel", "weights", "note"}
DEFAULT_FILES = (("BENCHMARKS.md", True), ("models/demo/README.md", False))


class CheckError(Exception):
    pass


# --- reading a report ------------------------------------------------------------------------------------------------

def _load(path: Path) -> dict:
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise CheckError(f"report {path} does not exist")
    return json.loads(path.read_text())


def _temperature(report: dict, keys: dict, rows: list[dict]) -> float:
    temps = sorted({r["temperature"] for r in rows})
    if "t" in keys:
        return float(keys["t"])
    if len(temps) != 1:
        raise CheckError(f"the report has temperatures {temps}: add a `T` column")
    return temps[0]


def _record(report: dict, keys: dict) -> dict:
    engine = keys.get("engine", "mtpx")
    rows = report.get("records", []) if engine == "mtpx" else [p for p in report.get("peers") or []
                                                                 if p.get("engine") == engine]
    if not rows:
        raise CheckError(f"the report has no {'records' if engine == 'mtpx' else engine + ' results'}")
    for k in ("workload", "mode"):
        if k not in keys:
            raise CheckError(f"a bench table needs a `{k}` column")
    t = _temperature(report, keys, rows)
    hit = [r for r in rows if r["workload"] == keys["workload"] and r["mode"] == keys["mode"]
           and r["temperature"] == t]
    if len(hit) != 1:
        raise CheckError(f"no single {engine} record for workload {keys['workload']!r}, mode {keys['mode']!r}, T {t:g}")
    return hit[0]


def _spec(keys: dict, value):
    """A speculation figure: none for plain decoding's rows (`value` is called only for the others)."""
    return None if keys.get("mode") == "none" else value()


def _vs_adaptive(report: dict, keys: dict):
    """The decode speed over that of mode `adaptive` (MTP alone, adaptive k) on the same workload, in this report;
    none for plain decoding's rows."""
    mine = _record(report, keys)["decode_tokens_per_s"]
    return _spec(keys, lambda: mine / _record(report, dict(keys, mode="adaptive"))["decode_tokens_per_s"])


def _vs_llamacpp(report: dict, keys: dict):
    """mtpx's decode speed over llama.cpp's in the same mode, both from this report; none on llama.cpp's own rows
    and for modes llama.cpp did not run."""
    if keys.get("engine", "mtpx") != "mtpx":
        return None
    mine = _record(report, keys)["decode_tokens_per_s"]
    try:
        theirs = _record(report, dict(keys, engine="llama.cpp"))["decode_tokens_per_s"]
    except CheckError:  # llama.cpp did not run this mode
        return None
    return mine / theirs


def _costs(report: dict, keys: dict | None = None) -> dict:
    """The cost model; with a `workload` key, the one measured at that context (`mtpx bench --context`)."""
    by_context = report.get("costs_by_context") or {}
    if keys and keys.get("workload") in by_context:
        return by_context[keys["workload"]]
    if not report.get("costs"):
        raise CheckError("the report has no cost model (it was run with --no-costs)")
    return report["costs"]


def _k(keys: dict) -> int:
    if "k" not in keys:
        raise CheckError("a cost-model table needs a `k` column")
    return int(keys["k"])


def _memory(report: dict, keys: dict) -> dict:
    mem = (report.get("memory") or {}).get(keys.get("mode"))
    if mem is None:
        raise CheckError(f"the report has no memory measurement for mode {keys.get('mode')!r}")
    return mem


def _step_ms(report: dict, n: int) -> float:
    times = report.get("step_times") or {}
    if f"graphs_T{n}_ms" not in times:
        raise CheckError(f"the report has no graph step time for {n} positions")
    return times[f"graphs_T{n}_ms"]


def _positions(keys: dict) -> int:
    if "positions" not in keys:
        raise CheckError("a step-time table needs a `positions` column")
    return int(keys["positions"])


def _cache(report: dict, keys: dict) -> dict:
    if "shape" not in keys:
        raise CheckError("a cache-size table needs a `shape` column")
    shapes = report.get("shapes") or {}
    if keys["shape"] not in shapes:
        raise CheckError(f"the report has no cache sizes for shape {keys['shape']!r}")
    return shapes[keys["shape"]]


# column -> (minimum decimals, value from (report, keys)); a value of None is shown as "–"
def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


METRICS = {
    "decode tok/s": (0, lambda rep, k: _record(rep, k)["decode_tokens_per_s"]),
    "prefill tok/s": (0, lambda rep, k: _record(rep, k)["prefill_tokens_per_s"]),
    "× plain": (2, lambda rep, k: _record(rep, k)["speedup"]),
    "× adaptive": (2, _vs_adaptive),
    "acceptance": (1, lambda rep, k: _spec(k, lambda: 100 * _record(rep, k)["acceptance_rate"])),
    "mean acc. len": (2, lambda rep, k: _spec(k, lambda: _record(rep, k)["mean_acceptance_length"])),
    "× llama.cpp": (2, _vs_llamacpp),
    "weights gb/s": (0, lambda rep, k: _record(rep, k).get("achieved_GBps")),
    "% of roof": (0, lambda rep, k: 100 * _record(rep, k)["bandwidth_fraction"]
                  if _record(rep, k).get("bandwidth_fraction") is not None else None),
    "verify / step": (2, lambda rep, k: _costs(rep, k)["verify_rel"][str(_k(k))]),
    "verify ms": (1, lambda rep, k: 1000 * _costs(rep, k)["verify_s"][str(_k(k) + 1)]),
    "step ms": (1, lambda rep, k: 1000 * _costs(rep, k)["plain_step_s"]),
    "mtp draft / step": (2, lambda rep, k: _costs(rep, k).get("c_mtp_chain", _costs(rep, k).get("c_mtp"))),
    "extra peak mib": (1, lambda rep, k: _spec(k, lambda: _memory(rep, k)["extra_peak_bytes"] / MiB)),
    "drafter stat mib": (1, lambda rep, k: _spec(k, lambda: _memory(rep, k)["drafter_memory_bytes"] / MiB)),
    "extra / stat": (2, lambda rep, k: _spec(k, lambda: _memory(rep, k)["extra_peak_bytes"]
                                          / _memory(rep, k)["drafter_memory_bytes"])),
    "cache bytes/token": (0, lambda rep, k: _cache(rep, k)["cache_bytes_per_token"]),
    "full k/v bytes/token": (0, lambda rep, k: _cache(rep, k)["full_kv_bytes_per_token"]),
    "cache / full k/v": (3, lambda rep, k: _cache(rep, k)["cache_over_full_kv"]),
    "mtp cache bytes/token": (0, lambda rep, k: _cache(rep, k)["mtp_cache_bytes_per_token"]),
    "round ms": (1, lambda rep, k: _scaled(_record(rep, k).get("round_s"), 1000)),  # only over several ranks
    "collectives ms / round": (1, lambda rep, k: _scaled(_record(rep, k).get("collective_s_per_round"), 1000)),
    "kib moved / round": (1, lambda rep, k: _scaled(_record(rep, k).get("collective_bytes_per_round"), 1 / 1024)),
    "prompt tokens": (0, lambda rep, k: _record(rep, k)["prompt_tokens_mean"]),
    "drafter prompt pass ms": (0, lambda rep, k: _spec(k, lambda: 1000 * _record(rep, k)["drafter_prefill_s"])),
    "main caches mib": (1, lambda rep, k: _record(rep, k)["cache_bytes"] / MiB),
    "drafter per sequence mib": (1, lambda rep, k: _spec(k, lambda: _record(rep, k)["drafter_sequence_bytes"] / MiB)),
    "drafter / main": (3, lambda rep, k: _spec(k, lambda: _record(rep, k)["drafter_sequence_bytes"]
                                            / _record(rep, k)["cache_bytes"])),
    # acceptance at draft position i; none where no draft reached it
    **{f"pos {i}": (2, lambda rep, k, i=i: _spec(k, lambda: (_record(rep, k)["acceptance_by_position"] + [None] * i)
                                                   [i - 1])) for i in range(1, 9)},
    "graph step ms": (2, lambda rep, k: _step_ms(rep, _positions(k))),
    "× one position": (2, lambda rep, k: _step_ms(rep, _positions(k)) / _step_ms(rep, 1)),
}


# --- reading the markdown --------------------------------------------------------------------------------------------

@dataclass
class Table:
    file: Path
    start: int                      # 0-based line of the header
    header: list[str]
    rows: list[tuple[int, list[str]]]
    report: str | None
    section: str                    # prose of the section above the table
    code: str                       # its code blocks, joined


@dataclass
class Result:
    errors: list[str] = field(default_factory=list)
    fixes: dict[int, str] = field(default_factory=dict)   # line -> corrected line
    tables: int = 0
    cells: int = 0


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(path: Path, lines: list[str]) -> list[Table]:
    out, section, code, report, fence = [], [], [], None, False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fence = not fence
            i += 1
            continue
        if fence:
            code.append(line)
            section.append(line)
            i += 1
            continue
        if line.startswith("#"):
            section, code, report = [line], [], None
            i += 1
            continue
        m = re.match(r"\s*Report:\s*`([^`]+)`", line)
        if m:
            report = m.group(1)
        if line.lstrip().startswith("|") and i + 1 < len(lines) and re.match(r"\s*\|[\s:|-]+\|\s*$", lines[i + 1]):
            start, header, rows = i, _cells(line), []
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append((i, _cells(lines[i])))
                i += 1
            out.append(Table(path, start, header, rows, report, "\n".join(section), "\n".join(code)))
            continue
        section.append(line)
        i += 1
    return out


def _norm_command(cmd: str) -> str:
    cmd = cmd.replace("\\\n", " ")
    words = shlex.split(cmd)
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words.pop(0)
    kept, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w == "--out":
            skip = True
        elif not w.startswith("--out="):
            kept.append(w)
    return " ".join(kept)


def _commands(code: str) -> set[str]:
    joined = code.replace("\\\n", " ")
    found = set()
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if line:
            try:
                found.add(_norm_command(line))
            except ValueError:
                pass
    return found


_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def _header_key(h: str) -> str:
    return re.sub(r"\s+", " ", h.replace("*", "").replace("`", "").strip().lower())


def _resolve(root: Path, ref: str) -> Path:
    for base in (root, root / "docs" / "bench"):
        if (base / ref).exists():
            return base / ref
    return root / ref


def check_table(root: Path, t: Table, res: Result, lines: list[str], strict: bool) -> None:
    where = f"{t.file.relative_to(root) if t.file.is_relative_to(root) else t.file}:{t.start + 1}"
    cols = [_header_key(h) for h in t.header]
    if t.report is None and "report" not in cols:
        if strict:
            res.errors.append(f"{where}: table ({' | '.join(t.header)}) cites no report: put a line "
                              "Report: `docs/bench/...` above it, or remove it")
        return
    unknown = [h for h in cols if h not in KEYS and h not in LABELS and h not in METRICS]
    if unknown:
        res.errors.append(f"{where}: unknown column(s) {unknown}; metrics: {sorted(METRICS)}; keys: {sorted(KEYS)}; "
                          f"labels: {sorted(LABELS)}")
        return
    res.tables += 1
    checked: set[str] = set()
    commands = _commands(t.code)
    for lineno, cells in t.rows:
        if len(cells) != len(cols):
            res.errors.append(f"{t.file.name}:{lineno + 1}: {len(cells)} cells for {len(cols)} columns")
            continue
        keys = {c: v.replace("*", "").replace("`", "").strip() for c, v in zip(cols, cells) if c in KEYS}
        ref = keys.pop("report", None) or t.report
        path = _resolve(root, ref)
        try:
            report = _load(path)
        except (CheckError, json.JSONDecodeError) as e:
            res.errors.append(f"{t.file.name}:{lineno + 1}: {e}")
            continue
        if ref not in checked:
            checked.add(ref)
            meta = report.get("meta")
            if meta:
                if meta.get("machine") and meta["machine"] not in t.section:
                    res.errors.append(f"{where}: the section does not name the machine of {ref}: "
                                      f"`{meta['machine']}`")
                want = _norm_command(meta.get("command", ""))
                if want and want not in commands:
                    res.errors.append(f"{where}: the section has no code block with the command of {ref}: {want}")
            elif report.get("device") and report["device"] not in t.section:
                res.errors.append(f"{where}: the section does not name the device of {ref}: `{report['device']}`")
        new_cells = list(cells)
        for j, (col, cell) in enumerate(zip(cols, cells)):
            if col not in METRICS:
                continue
            res.cells += 1
            min_dec, get = METRICS[col]
            label = f"{t.file.name}:{lineno + 1}: column '{t.header[j]}', row {' / '.join(keys.values())}"
            try:
                value = get(report, keys)
            except (CheckError, KeyError, TypeError) as e:
                res.errors.append(f"{label}: {e} ({ref})")
                continue
            m = _NUM.search(cell)
            if value is None:
                if m:
                    res.errors.append(f"{label}: shows {m.group(0)}, but {ref} has no value there (write –)")
                    new_cells[j] = "–"
                continue
            if not m:
                expect = f"{value:.{min_dec}f}"
                res.errors.append(f"{label}: shows {cell!r}, {ref} gives {value:.4g} -> {expect}")
                new_cells[j] = expect
                continue
            shown = m.group(0)
            dec = len(shown.split(".")[1]) if "." in shown else 0
            if dec < min_dec:
                res.errors.append(f"{label}: {shown} has {dec} decimals, at least {min_dec} are needed")
                dec = min_dec
            expect = f"{value:.{dec}f}"
            if expect != shown:
                res.errors.append(f"{label}: doc says {shown}, {ref} gives {value:.4g} -> {expect}")
                new_cells[j] = cell[:m.start()] + expect + cell[m.end():]
        if new_cells != cells:
            indent = lines[lineno][:len(lines[lineno]) - len(lines[lineno].lstrip())]
            res.fixes[lineno] = indent + "| " + " | ".join(new_cells) + " |"


def check_file(root: Path, path: Path, strict: bool, write: bool = False) -> Result:
    text = path.read_text()
    lines = text.splitlines()
    res = Result()
    for t in tables(path, lines):
        check_table(root, t, res, lines, strict)
    if write and res.fixes:
        for i, line in res.fixes.items():
            lines[i] = line
        path.write_text("\n".join(lines) + ("\n" if text.endswith("\n") else ""))
    return res


def repo_root() -> Path:
    here = Path(__file__).resolve().parents[3]
    return here if (here / "BENCHMARKS.md").exists() else Path.cwd()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtpx.bench.docs_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="default: BENCHMARKS.md (strict) and models/demo/README.md")
    ap.add_argument("--root", type=Path, default=None, help="repository root (default: this checkout)")
    ap.add_argument("--strict", action="store_true", help="every table in FILES must cite a report")
    ap.add_argument("--write", action="store_true", help="rewrite cells that disagree with their report")
    a = ap.parse_args(argv)
    root = (a.root or repo_root()).resolve()
    files = [(f if f.is_absolute() else Path.cwd() / f, a.strict) for f in a.files] or \
        [(root / f, strict) for f, strict in DEFAULT_FILES]
    failed = False
    for path, strict in files:
        res = check_file(root, path, strict, write=a.write)
        if a.write and res.fixes:  # what the rewrite could not fix
            fixed = len(res.fixes)
            res = check_file(root, path, strict)
            res.fixes = {i: "" for i in range(fixed)}
        for e in res.errors:
            print(e, file=sys.stderr)
        status = "FAILED" if res.errors else "ok"
        if a.write and res.fixes:
            status += f", {len(res.fixes)} row(s) rewritten"
        name = path.relative_to(root) if path.is_relative_to(root) else path
        print(f"{name}: {res.tables} tables, {res.cells} figures checked: {status}")
        failed |= bool(res.errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
