"""`mtpx run`'s decoding options on the bundled model."""
from mtpx.cli import main
from mtpx.engine.flags import sequence_breakers

PROMPT = "import os\n\n\ndef read_lines(path):\n"


def run(capsys, *extra: str) -> str:
    assert main(["run", "--model", "demo", "--prompt", PROMPT, "--max-tokens", "60", "--temperature", "0",
                 *extra]) == 0
    return capsys.readouterr().out


def test_dry_options_change_the_text_and_keep_mtp_lossless(capsys):
    plain = run(capsys, "--spec-type", "none")
    dry = ["--dry-multiplier", "0.8", "--dry-allowed-length", "2", "--dry-sequence-breaker", "\\n"]
    with_dry = run(capsys, *dry, "--spec-type", "none")
    assert with_dry != plain  # the bundled model loops on this prompt, and DRY breaks the loop
    assert run(capsys, *dry, "--spec-type", "mtp") == with_dry


def test_sequence_breakers_read_escapes_and_none():
    assert sequence_breakers(None) is None  # the defaults
    assert sequence_breakers(["\\n", ":", "é"]) == ["\n", ":", "é"]
    assert sequence_breakers(["none"]) == []


def test_mtp_is_on_by_default_where_the_model_has_an_mtp_layer(capsys):
    import json
    assert main(["run", "--model", "demo", "--prompt", PROMPT, "--max-tokens", "8", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["spec_type"] == "mtp" and stats["drafts"] > 0
    assert main(["run", "--model", "demo", "--prompt", PROMPT, "--max-tokens", "8", "--json",
                 "--spec-type", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["spec_type"] == "none"


def test_spec_from_args_defaults():
    import argparse

    from mtpx.engine.flags import add_spec_arguments, spec_from_args
    p = argparse.ArgumentParser()
    add_spec_arguments(p)
    args = p.parse_args([])
    assert spec_from_args(args, has_mtp=True).kind == "mtp"
    assert spec_from_args(args, has_mtp=True).spec_draft_policy == "adaptive"
    assert spec_from_args(args, has_mtp=False).kind == "none"  # no MTP layer: plain decoding
    assert spec_from_args(p.parse_args(["--spec-type", "none"]), has_mtp=True).kind == "none"
    assert spec_from_args(p.parse_args(["--spec-type", "ngram"]), has_mtp=False).kind == "ngram"


def test_finish_reason_is_printed_when_it_is_not_stop(capsys):
    assert main(["run", "--model", "demo", "--prompt", PROMPT, "--max-tokens", "5"]) == 0
    err = capsys.readouterr().err
    assert "finish reason: length (stopped at --max-tokens 5)" in err


def test_version_and_help(capsys):
    from mtpx.cli import version
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mtpx {version()}" and version() != "unknown"
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "mtpx COMMAND --help" in out and "--version" in out and "--spec-type none" in out
    import pytest
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for text in ("most tokens to generate (default 128)", "random seed", "most draft tokens a round (default 3)",
                 "when the model has an MTP layer", "(default adaptive)"):
        assert text in " ".join(out.split()), text


def test_a_short_prompt_reports_its_time_to_first_token_not_a_prefill_rate():
    from mtpx.commands.run import stats_line
    stats = {"prompt_tokens": 5, "prefill_tokens_per_s": 4.8, "time_to_first_token_s": 1.04, "generated_tokens": 16,
             "decode_tokens_per_s": 140.0}
    assert "first token after 1040 ms" in stats_line(stats) and "4.8" not in stats_line(stats)
    assert "prefill 950.0 tok/s" in stats_line({**stats, "prompt_tokens": 950, "prefill_tokens_per_s": 950.0})
