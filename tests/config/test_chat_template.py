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


def test_the_engines_apply_the_configured_template(random_model_dirs):
    """LLM (in process) and AsyncEngine (the serving client) both read chat_template from the config."""
    from ember import LLM, AsyncEngine, CacheConfig, EngineConfig

    path = str(random_model_dirs["llama-gqa"])
    llm = LLM(model=path, num_blocks=16, chat_template=TEMPLATE)
    engine = AsyncEngine(EngineConfig(model=path, cache=CacheConfig(num_blocks=16), chat_template=TEMPLATE))
    try:
        for tok in (llm.tokenizer, engine.tokenizer):
            ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
            assert tok.decode(ids, skip_special_tokens=False) == "<user>hi"
    finally:
        engine.shutdown()
