"""The docs' figures against the committed bench reports (`python -m mtpx.bench.docs_check`): the real BENCHMARKS.md
and model card pass, and a table that disagrees with its report, cites none, or hides its command fails."""
from __future__ import annotations

from pathlib import Path

from mtpx.bench import docs_check

ROOT = Path(__file__).resolve().parents[2]
MACHINE = "2 × Intel(R) Xeon(R) Processor (avx512_bf16, amx_bf16, avx512f, avx2), 24 GiB RAM"
COMMAND = ("mtpx bench --model demo --workloads code,chat --modes none,mtp3v2048,mtp4v2048,mtp6v2048,adaptive "
           "--adaptive-n-max 6 --temperature 0 --max-prompts 6 --repeat 3 --no-memory --no-roofline --no-plots "
           "--no-costs --out docs/bench/demo-v5-s11/greedy")
TABLE = """| workload | mode | decode tok/s | × plain | acceptance | mean acc. len |
|---|---|---|---|---|---|
| code | none | 1004 | 1.00 | – | – |
| code | mtp6v2048 | 1986 | **{speedup}** | 57.5 % | 4.42 |
"""


def _doc(tmp_path: Path, speedup: str = "1.98", command: str = COMMAND, report: bool = True) -> Path:
    path = tmp_path / "doc.md"
    path.write_text(f"# t\n\nMachine: `{MACHINE}`.\n\n```sh\n{command}\n```\n\n"
                    + ("Report: `docs/bench/demo-v5-s11/greedy/results.json`\n\n" if report else "")
                    + TABLE.format(speedup=speedup))
    return path


def test_the_committed_docs_match_their_reports():
    for name, strict in docs_check.DEFAULT_FILES:
        res = docs_check.check_file(ROOT, ROOT / name, strict)
        assert res.errors == [], "\n".join(res.errors)
    assert docs_check.check_file(ROOT, ROOT / "BENCHMARKS.md", True).tables >= 6
    assert docs_check.main(["--root", str(ROOT)]) == 0


def test_a_right_table_passes(tmp_path):
    res = docs_check.check_file(ROOT, _doc(tmp_path), strict=True)
    assert res.errors == [] and res.tables == 1 and res.cells == 8


def test_a_wrong_figure_fails_and_write_fixes_it(tmp_path):
    path = _doc(tmp_path, speedup="2.05")
    res = docs_check.check_file(ROOT, path, strict=True)
    assert len(res.errors) == 1
    assert "× plain" in res.errors[0] and "doc says 2.05" in res.errors[0] and "1.98" in res.errors[0]
    assert docs_check.main([str(path), "--root", str(ROOT)]) == 1
    docs_check.check_file(ROOT, path, strict=True, write=True)
    assert "**1.98**" in path.read_text()
    assert docs_check.check_file(ROOT, path, strict=True).errors == []


def test_write_fixes_a_dash_where_the_report_has_a_value_and_a_value_where_it_has_none(tmp_path):
    path = _doc(tmp_path)
    plain_row = "| code | none | 1004 | 1.00 | – | – |"
    text = path.read_text().replace(plain_row, "| code | none | 1004 | 1.00 | 12.0 % | – |")
    path.write_text(text.replace("57.5 % | 4.42 |", "57.5 % | – |"))
    res = docs_check.check_file(ROOT, path, strict=True, write=True)
    assert len(res.errors) == 2 and any("no value there" in e for e in res.errors)
    assert plain_row in path.read_text() and "57.5 % | 4.42 |" in path.read_text()
    assert docs_check.check_file(ROOT, path, strict=True).errors == []


def test_too_few_decimals_fail(tmp_path):
    res = docs_check.check_file(ROOT, _doc(tmp_path, speedup="2"), strict=True)
    assert any("decimals" in e for e in res.errors)


def test_a_table_without_a_report_fails_in_strict_files(tmp_path):
    path = _doc(tmp_path, report=False)
    assert any("cites no report" in e for e in docs_check.check_file(ROOT, path, strict=True).errors)
    assert docs_check.check_file(ROOT, path, strict=False).errors == []


def test_the_reports_command_must_be_shown(tmp_path):
    res = docs_check.check_file(ROOT, _doc(tmp_path, command=COMMAND.replace("--repeat 3", "--repeat 5")), strict=True)
    assert any("command" in e for e in res.errors)


def test_an_unknown_column_fails(tmp_path):
    path = _doc(tmp_path)
    path.write_text(path.read_text().replace("× plain", "speedup"))
    assert any("unknown column" in e for e in docs_check.check_file(ROOT, path, strict=True).errors)


def test_a_cache_size_table_is_checked_by_shape(tmp_path):
    import json

    from mtpx.bench.cache_size import cache_sizes
    from mtpx.bench.gen_checkpoint import shape_config
    command = "mtpx bench cache-size --shape deepseek-v3 --out cache.json"
    (tmp_path / "cache.json").write_text(json.dumps(
        {"meta": {"command": command}, "shapes": {"deepseek-v3": cache_sizes(shape_config("deepseek-v3"))}}))
    doc = tmp_path / "doc.md"
    table = ("| shape | cache bytes/token | full K/V bytes/token | cache / full K/V |\n|---|---|---|---|\n"
             "| deepseek-v3 | 70272 | 4997120 | {ratio} |\n")
    doc.write_text(f"# t\n\n```sh\n{command}\n```\n\nReport: `cache.json`\n\n" + table.format(ratio="0.014"))
    res = docs_check.check_file(tmp_path, doc, strict=True)
    assert res.errors == [] and res.cells == 3
    doc.write_text(f"# t\n\n```sh\n{command}\n```\n\nReport: `cache.json`\n\n" + table.format(ratio="0.020"))
    assert "doc says 0.020" in docs_check.check_file(tmp_path, doc, strict=True).errors[0]
