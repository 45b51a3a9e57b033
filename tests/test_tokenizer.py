"""Tokenizer round trip and chat template rendering, against transformers."""
from mtpx.loading import load_checkpoint

TEXTS = ["def add(a, b):\n    return a + b\n", "Hello, world! Ünïcödé ✓ 你好", "  leading spaces\tand tabs\n\n"]


def test_round_trip_and_ids_match_transformers(dense_ckpt):
    from transformers import AutoTokenizer
    ours = load_checkpoint(dense_ckpt).tokenizer
    theirs = AutoTokenizer.from_pretrained(dense_ckpt)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == text
        assert ids == theirs.encode(text, add_special_tokens=False)


def test_chat_template_rendered_as_transformers_does(dense_ckpt):
    from transformers import AutoTokenizer
    ours = load_checkpoint(dense_ckpt).tokenizer
    theirs = AutoTokenizer.from_pretrained(dense_ckpt)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
    for gen in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == theirs.apply_chat_template(
            messages, add_generation_prompt=gen, tokenize=False)
