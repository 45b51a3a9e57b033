"""`mtpx run`'s decoding options on the bundled model."""
from mtpx.cli import main
from mtpx.engine.flags import sequence_breakers

PROMPT = "import os\n\n\ndef read_lines(path):\n"


def run(capsys, *extra: str) -> str:
    assert main(["run", "--model", "demo", "--prompt", PROMPT, "--max-tokens", "60", "--temperature", "0",
                 *extra]) == 0
    return capsys.readouterr().out


def test_dry_options_change_the_text_and_keep_mtp_lossless(capsys):
    plain = run(capsys)
    dry = ["--dry-multiplier", "0.8", "--dry-allowed-length", "2", "--dry-sequence-breaker", "\\n"]
    with_dry = run(capsys, *dry)
    assert with_dry != plain  # the bundled model loops on this prompt, and DRY breaks the loop
    assert run(capsys, *dry, "--spec-type", "mtp") == with_dry


def test_sequence_breakers_read_escapes_and_none():
    assert sequence_breakers(None) is None  # the defaults
    assert sequence_breakers(["\\n", ":", "é"]) == ["\n", ":", "é"]
    assert sequence_breakers(["none"]) == []
