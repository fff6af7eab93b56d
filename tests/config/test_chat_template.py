"""--chat-template: a Jinja file or the template text replaces the model's own (ember/tokenizer.py)."""

from __future__ import annotations

import pytest

from ember.tokenizer import Tokenizer

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


@pytest.mark.parametrize("as_file", [False, True])
def test_a_chat_template_replaces_the_models(default_model_dir, tmp_path, as_file):
    value = TEMPLATE
    if as_file:
        value = str(tmp_path / "t.jinja")
        (tmp_path / "t.jinja").write_text(TEMPLATE)
    tok = Tokenizer.from_dir(default_model_dir, chat_template=value)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.decode(ids, skip_special_tokens=False) == "<user>hi"
    assert Tokenizer.from_dir(default_model_dir).hf.chat_template != TEMPLATE


def test_a_missing_template_file_says_what_to_pass(default_model_dir):
    with pytest.raises(FileNotFoundError, match="neither a file nor a Jinja template"):
        Tokenizer.from_dir(default_model_dir, chat_template="no/such.jinja")
