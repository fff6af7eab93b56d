"""An adapter ember trained, served by ember, gives PEFT's merged model's greedy tokens."""

from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams
from ember.tune.trainer import TuneConfig, train
from tests.conftest import build_random_model
from tests.helpers import hf_greedy
from tests.tune.reference import random_examples

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[5, 17, 300 + 11 * i, 42, 7 * i + 1, 900 + i] * 2 for i in range(20)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("served")
    base = build_random_model(root, "llama-gqa", default_model_dir)
    cfg = TuneConfig(r=8, lora_alpha=16, use_rslora=True, batch_size=4, epochs=2, learning_rate=3e-2)
    result = train(str(base), random_examples(8, seed=11), None, cfg, str(root / "run"))
    return base, result.adapter_dir


def test_served_adapter_equals_peft_merged(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapter = trained
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    bare = [hf_greedy(hf, p, GREEDY.max_tokens, [2]) for p in PROMPTS]
    merged = PeftModel.from_pretrained(hf, adapter).merge_and_unload().eval()
    want = [hf_greedy(merged, p, GREEDY.max_tokens, [2]) for p in PROMPTS]
    llm = LLM(model=str(base_dir), enable_lora=True, max_lora_rank=8, num_blocks=256)
    try:
        llm.add_lora("tuned", adapter)
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, lora="tuned", use_tqdm=False)]
    finally:
        llm.close()
    assert [list(g) for g in got] == want
    assert sum(w != b for w, b in zip(want, bare, strict=True)) >= 5  # the adapter changes what is generated
