"""`mtpx chat`: streaming replies on stdout, a stats line per reply on stderr, history, /reset, /exit."""
from __future__ import annotations

import subprocess
import sys


def run_chat(ckpt, stdin: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtpx.cli", "chat", "--model", str(ckpt), "--max-tokens", "8",
                           "--spec-type", "mtp", *extra], input=stdin, capture_output=True, text=True, timeout=120)


def test_chat_streams_replies_with_stats_and_history(dense_ckpt, serve_llm):
    p = run_chat(dense_ckpt, "hello there\nand again\n/exit\nnever read\n")
    assert p.returncode == 0, p.stderr
    stats = [line for line in p.stderr.splitlines() if "decode" in line and "tok/s" in line]
    assert len(stats) == 2, p.stderr
    # the first reply is the greedy reply to the first message; the second saw the first exchange as history
    tok = serve_llm.tokenizer
    first = serve_llm.generate(tok.apply_chat_template([{"role": "user", "content": "hello there"}]), max_tokens=8, spec_type="none")
    second = serve_llm.generate(tok.apply_chat_template([
        {"role": "user", "content": "hello there"}, {"role": "assistant", "content": first.text},
        {"role": "user", "content": "and again"}]), max_tokens=8, spec_type="none")
    assert p.stdout == first.text + "\n" + second.text + "\n"


def test_chat_reset_and_eof(dense_ckpt, serve_llm, monkeypatch, capsys):
    import io

    from mtpx.cli import main
    monkeypatch.setattr(sys, "stdin", io.StringIO("and again\n/reset\nand again\n"))  # EOF ends the session
    assert main(["chat", "--model", str(dense_ckpt), "--max-tokens", "8", "--no-stats"]) == 0
    out, err = capsys.readouterr()
    assert "history cleared" in err and "tok/s" not in err
    ref = serve_llm.generate(serve_llm.tokenizer.apply_chat_template([{"role": "user", "content": "and again"}]),
                             max_tokens=8, spec_type="none").text
    assert out == ref + "\n" + ref + "\n"


def test_chat_bad_settings_fail_cleanly(dense_ckpt, capsys):
    from mtpx.cli import main
    assert main(["chat", "--model", str(dense_ckpt), "--spec-type", "bogus"]) == 1
    assert "unknown spec_type" in capsys.readouterr().err
